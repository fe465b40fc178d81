"""``rldiff serve``: the Serve application on this machine, on 127.0.0.1 unless told otherwise.

Starts a local Ray (loopback only), runs the application built by ``rldiff.serving.app.build_app``
and serves until interrupted (Ctrl-C) or, with ``--for-seconds``, for that long.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rldiff.config import LOOPBACK, ServeRun, add_flags, from_flags


def add_arguments(parser) -> None:
    """The ``rldiff serve`` flags: where to listen, then one per ``AppArgs`` setting."""
    from rldiff.serving.app import AppArgs

    add_flags(parser, ServeRun, title="server")
    add_flags(parser, AppArgs, title="application (AppArgs)")


def check_inputs(app_args) -> str:
    """Checks the model, the policy and the API key before anything starts, raising a
    ``ValueError`` or ``FileNotFoundError`` with one clear sentence; returns what will be served.
    A policy that does not load is an error unless ``allow_degraded``."""
    from rldiff.data.models import load_model
    from rldiff.serving.auth import ApiKey
    from rldiff.serving.catalog import Catalog

    ApiKey.load(app_args.api_key_env, app_args.api_key_file, app_args.require_api_key)
    root = Path(app_args.policy_root)
    if not root.is_dir():
        raise FileNotFoundError(f"policy root {root} does not exist")
    if app_args.evaluation and not Path(app_args.evaluation).is_dir():
        raise FileNotFoundError(f"evaluation directory {app_args.evaluation} does not exist")
    try:
        denoiser = load_model(app_args.model, "cpu")
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # a library's error about a broken model directory
        why = f"{type(err).__name__}: {err}"
        raise ValueError(f"model {app_args.model} does not load: {why}") from None
    catalog = Catalog(app_args.model, denoiser, root, app_args.evaluation)
    if catalog.swap(app_args.policy):
        return f"policy {app_args.policy}"
    why = catalog.last_swap["error"]
    if not app_args.allow_degraded:
        raise ValueError(
            f"policy {app_args.policy!r} cannot be served ({why}); pass --allow-degraded to serve "
            "the best hand-built schedule per budget instead"
        )
    return f"DEGRADED: the best hand-built schedule per budget ({why})"


def run(args) -> int:
    """Serves until interrupted; returns the exit status."""
    from rldiff.serving.app import AppArgs, build_app, cluster_env

    server, app_args = from_flags(ServeRun, args), from_flags(AppArgs, args)
    serving = check_inputs(app_args)  # before Ray: a bad input fails here, in one line
    if server.host == LOOPBACK:  # every Ray socket on loopback too (before Ray starts)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cluster_env()  # Serve's proxy settings, for the Ray started here
    app = build_app(app_args)
    import ray
    from ray import serve

    # A fresh local Ray, not whichever one is running here (RAY_ADDRESS picks one on purpose).
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(app, name="rldiff", route_prefix="/")
        url = f"http://{server.host}:{server.port}"
        print(f"serving {serving} on {url} (playground: {url}/playground; API docs: {url}/docs;")
        print(f"  health: {url}/v1/health; metrics: {url}/metrics); Ctrl-C stops")
        deadline = None if server.for_seconds is None else time.monotonic() + server.for_seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
