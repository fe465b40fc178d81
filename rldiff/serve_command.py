"""``rldiff serve``: the Serve application on this machine, on 127.0.0.1 unless told otherwise.

Starts a local Ray (loopback only), runs the application built by ``rldiff.serving.app.build_app``
and serves until interrupted (Ctrl-C) or, with ``--for-seconds``, for that long.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def add_arguments(parser) -> None:
    """The ``rldiff serve`` flags."""
    from rldiff.serving.app import AppArgs

    d = AppArgs()
    parser.add_argument("--model", default=d.model, help="embedded | gmm | a diffusers directory")
    parser.add_argument(
        "--policy", default=None, help="learned policy directory, relative to --policy-root"
    )
    parser.add_argument(
        "--policy-root",
        default=d.policy_root,
        help="policy directories load only from inside this directory",
    )
    parser.add_argument(
        "--evaluation",
        default=None,
        help="an evaluation directory (results.parquet): the best hand-built schedule per "
        "budget, served when no learned policy loads",
    )
    parser.add_argument("--host", default=LOOPBACK, help="HTTP address (default loopback only)")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument(
        "--api-key-file", default=None, help="file holding the API key (else $RLDIFF_API_KEY)"
    )
    parser.add_argument(
        "--require-api-key", action="store_true", help="refuse to start without an API key"
    )
    parser.add_argument("--max-samples", type=_positive, default=d.max_samples)
    parser.add_argument("--max-budget", type=_positive, default=d.max_budget)
    parser.add_argument("--no-access-log", action="store_true", help="no per-request log lines")
    parser.add_argument(
        "--for-seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)"
    )


def run(args) -> int:
    """Serves until interrupted; returns the exit status."""
    from rldiff.serving.app import build_app
    from rldiff.serving.auth import DEFAULT_ENV, ApiKey

    ApiKey.load(DEFAULT_ENV, args.api_key_file, args.require_api_key)  # fails before Ray starts
    if args.policy_root and not Path(args.policy_root).is_dir():
        raise FileNotFoundError(f"policy root {args.policy_root} does not exist")
    if args.host == LOOPBACK:  # every Ray socket on loopback too (before Ray starts)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    app = build_app(
        {
            "model": args.model,
            "policy": args.policy,
            "policy_root": args.policy_root,
            "evaluation": args.evaluation,
            "api_key_file": args.api_key_file,
            "require_api_key": args.require_api_key,
            "max_samples": args.max_samples,
            "max_budget": args.max_budget,
            "access_log": not args.no_access_log,
        }
    )
    import ray
    from ray import serve

    # A fresh local Ray, not whichever one is running here (RAY_ADDRESS picks one on purpose).
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="rldiff", route_prefix="/")
        print(f"serving on http://{args.host}:{args.port} (API docs: /docs); Ctrl-C stops")
        deadline = None if args.for_seconds is None else time.monotonic() + args.for_seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _port(text: str) -> int:
    import argparse

    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {value}")
    return value
