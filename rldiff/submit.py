"""``rldiff submit``: run a command as a Ray job on a cluster and follow it to its end.

A thin layer over Ray's ``JobSubmissionClient``: submit the command with the runtime environment
of ``jobs/runtime_env.yaml`` (the code of the current directory, uploaded; one torch thread),
stream the job's logs until it ends, and exit with a status that says how it ended (0 succeeded,
1 failed or stopped, 124 still running when the wait ran out). Leaving (Ctrl-C, or the wait
running out) never stops the job: it goes on on the cluster, and ``ray job logs`` / ``ray job
stop`` take it from there. Usage::

    rldiff submit -- python jobs/train.py --model gmm --iterations 30 --out /shared/runs/gmm
    rldiff submit --address http://127.0.0.1:8265 --timeout 0 -- python jobs/train.py ...

Clusters started from ``cluster.yaml`` use token authentication: the client needs
``RAY_AUTH_MODE=token`` and the cluster's token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``). Missing or rejected tokens and unreachable addresses are reported in a
sentence, without a stack trace.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the job API of a local head or a `ray dashboard` tunnel
DEFAULT_RUNTIME_ENV = "jobs/runtime_env.yaml"
DESCRIPTION = "run a command as a Ray job on a cluster and follow it to its end"
DEFAULT_TIMEOUT_S = 24 * 3600
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_STILL_RUNNING = 0, 1, 124
TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and give the cluster's token as ~/.ray/auth_token, "
    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (on the head: `ray get-auth-token`)"
)


class SubmitError(Exception):
    """A problem the user can fix (address, token, runtime environment): one sentence, no trace."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help=f"the cluster's job API (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--runtime-env",
        type=Path,
        default=None,
        help=f"runtime environment YAML (default: {DEFAULT_RUNTIME_ENV} if it is here, else the "
        "rldiff installed on the cluster with one torch thread)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to follow the job before leaving it running (0: submit and return)",
    )
    parser.add_argument("--submission-id", default=None, help="the job's id (default: Ray's)")
    parser.add_argument(
        "entrypoint", nargs=argparse.REMAINDER, help="-- the command to run on the cluster"
    )


def run(args: argparse.Namespace) -> int:
    """``rldiff submit``: returns the exit status (see the module docstring); 2 on bad input."""
    command = list(args.entrypoint)
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        if not command:
            raise SubmitError("no command: rldiff submit [options] -- <command ...>")
        if args.timeout < 0:
            raise SubmitError(f"--timeout must be >= 0, got {args.timeout}")
        runtime_env = default_runtime_env() if args.runtime_env is None else None
        runtime_env = runtime_env or load_runtime_env(args.runtime_env or DEFAULT_RUNTIME_ENV)
        address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        client = connect(address)
        job_id = submit(client, shlex.join(command), runtime_env, args.submission_id)
        print(f"submitted {job_id} to {address}", flush=True)
        if args.timeout == 0:
            print(f"follow it with: ray job logs --follow --address {address} {job_id}")
            return EXIT_SUCCEEDED
        try:
            return follow(client, job_id, address, args.timeout)
        except (RuntimeError, OSError) as err:  # the cluster went away while we followed
            raise SubmitError(f"lost the job API at {address}: {_first_line(err)}") from None
    except SubmitError as err:
        print(f"rldiff submit: error: {err}", file=sys.stderr)
        return 2


def default_runtime_env() -> dict | None:
    """None in the repository root (``jobs/runtime_env.yaml`` is read: this directory's code is
    uploaded); elsewhere the job runs the rldiff installed on the nodes (cluster.yaml), with one
    torch thread."""
    if Path(DEFAULT_RUNTIME_ENV).is_file():
        return None
    print(
        f"no {DEFAULT_RUNTIME_ENV} here: the job runs the rldiff installed on the cluster "
        "(pass --runtime-env to upload code)",
        flush=True,
    )
    return {"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}}


def load_runtime_env(path: Path) -> dict:
    """The runtime environment YAML as a dict; a local ``working_dir`` must exist (relative paths
    count from the current directory, as with ``ray job submit``)."""
    if not Path(path).is_file():
        raise SubmitError(f"runtime environment file {path} does not exist")
    try:
        env = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise SubmitError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(env, dict):
        raise SubmitError(f"{path} must hold a mapping (working_dir, excludes, env_vars, ...)")
    working_dir = env.get("working_dir")
    if working_dir and "://" not in str(working_dir) and not Path(working_dir).is_dir():
        raise SubmitError(
            f"working_dir {working_dir!r} of {path} is not a directory here "
            f"(run from the repository root, or fix the path)"
        )
    return env


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address``, or a ``SubmitError`` that says what is wrong."""
    from ray.exceptions import AuthenticationError, RayError
    from ray.job_submission import JobSubmissionClient

    check_token_source()
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        reason = f"{err.message}".strip().split("\n")[0].rstrip(".")  # without Ray's long help
        raise SubmitError(f"{address} refused the request ({reason}): {TOKEN_HINT}") from None
    except ConnectionError:
        raise SubmitError(
            f"cannot reach a Ray job API at {address}: is the cluster up (`ray status`), and for "
            f"a cloud cluster is `ray dashboard cluster.yaml` running? Pass --address or set "
            f"RAY_ADDRESS"
        ) from None
    except (RayError, RuntimeError, ValueError, OSError) as err:  # a malformed URL, no GCS, ...
        raise SubmitError(f"{address}: {_first_line(err)}") from None


def check_token_source() -> None:
    """With ``RAY_AUTH_MODE=token``, fails early when no token can be found (Ray itself would only
    log a warning and let the cluster answer 401)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).is_file() or not Path(path).read_text().strip():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is not a file holding a token")
        return
    if not (Path.home() / ".ray" / "auth_token").is_file():
        raise SubmitError(f"RAY_AUTH_MODE=token but no token was found: {TOKEN_HINT}")


def submit(client, entrypoint: str, runtime_env: dict, submission_id: str | None) -> str:
    """Submits ``entrypoint`` (uploading the working directory); returns the job's id."""
    try:
        return client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id
        )
    except (RuntimeError, ValueError) as err:  # e.g. a duplicate id, an upload over the limit
        raise SubmitError(f"submission failed: {_first_line(err)}") from None


def follow(client, job_id: str, address: str, timeout: float) -> int:
    """Streams the job's logs for at most ``timeout`` seconds; the exit status of its end."""
    deadline = time.monotonic() + timeout
    try:
        asyncio.run(asyncio.wait_for(_print_logs(client, job_id), timeout))
    except TimeoutError:
        pass
    except KeyboardInterrupt:
        print(f"\nleft {job_id} running; stop it with: ray job stop {job_id}", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as err:  # the log stream broke: fall back to polling
        print(f"log stream closed ({_first_line(err)}); waiting for the job", file=sys.stderr)
    status = _wait_terminal(client, job_id, deadline)
    if not status.is_terminal():
        print(
            f"{job_id} still {status} after {timeout:.0f} s; it goes on: "
            f"ray job logs --follow --address {address} {job_id}",
            file=sys.stderr,
        )
        return EXIT_STILL_RUNNING
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if info.message else ""), flush=True)
    return EXIT_SUCCEEDED if str(status) == "SUCCEEDED" else EXIT_FAILED


async def _print_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _wait_terminal(client, job_id: str, deadline: float):
    """The job's status once terminal, or its current one at ``deadline`` (polled each second:
    the log stream can end a moment before the status turns terminal)."""
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or time.monotonic() >= deadline:
            return status
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """``python -m rldiff.submit [options] -- <command ...>`` (the same as ``rldiff submit``)."""
    parser = argparse.ArgumentParser(prog="rldiff submit", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
