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


def run(args) -> int:
    """Serves until interrupted; returns the exit status."""
    from rldiff.serving.app import AppArgs, build_app
    from rldiff.serving.auth import ApiKey

    server, app_args = from_flags(ServeRun, args), from_flags(AppArgs, args)
    ApiKey.load(app_args.api_key_env, app_args.api_key_file, app_args.require_api_key)  # before Ray
    if app_args.policy_root and not Path(app_args.policy_root).is_dir():
        raise FileNotFoundError(f"policy root {app_args.policy_root} does not exist")
    if server.host == LOOPBACK:  # every Ray socket on loopback too (before Ray starts)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    app = build_app(app_args)
    import ray
    from ray import serve

    # A fresh local Ray, not whichever one is running here (RAY_ADDRESS picks one on purpose).
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(app, name="rldiff", route_prefix="/")
        print(f"serving on http://{server.host}:{server.port} (API docs: /docs); Ctrl-C stops")
        deadline = None if server.for_seconds is None else time.monotonic() + server.for_seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
