"""Benchmark: the traffic log under load, with its directory made read-only mid-run.

Run (from the repository root, as root for the read-only part; about 1.5 minutes per run on 2
busy cores):

    flock /tmp/bench.lock .venv/bin/python jobs/bench_traffic_log.py [--seconds 60] [--clients 8]
    flock /tmp/bench.lock .venv/bin/python jobs/bench_traffic_log.py --readonly-after 20
    flock /tmp/bench.lock .venv/bin/python jobs/bench_traffic_log.py --readonly-after 20 \\
        --writable-after 40

It serves the mixture model (``model=gmm``, an UNTRAINED exported policy: its cost is a trained
one's) on 127.0.0.1 with the traffic log on (``traffic_log``, ``traffic_log_flush_s``), and
sends one-sample requests from ``--clients`` concurrent clients for ``--seconds``
(``jobs/bench_serve.py``'s clients). The log directory is a tmpfs mounted for the run, so that
``--readonly-after S`` can remount it read-only S seconds into the load (a real read-only file
system, which stops root too) and ``--writable-after S`` read-write again. Without ``mount``
(not root) it replaces the directory with a file instead, which makes it unwritable as well.

Results to expect: every request answered 200 in every run; with the directory writable
throughout, the rows in the Parquet files equal the requests served; with it read-only until the
end, the rows written before it are in the files, the rest stay buffered (``rows_pending``; the
health check says ``degraded``) until the buffer is full or the service stops, and are counted
as dropped; written + dropped + pending = served. It prints the numbers, no asserts; Serve and Ray
are shut down and the tmpfs unmounted at the end.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import concurrent, free_port, percentile  # noqa: E402  (sets the Ray env too)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mount_tmpfs(directory: Path) -> bool:
    """A 256 MiB tmpfs on ``directory``; False where ``mount`` is not allowed."""
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(directory)], capture_output=True
    )
    return done.returncode == 0


def set_writable(directory: Path, writable: bool, mounted: bool) -> str:
    """Makes the log directory read-only (or writable again); returns how."""
    if mounted:
        mode = "rw" if writable else "ro"
        subprocess.run(["mount", "-o", f"remount,{mode}", str(directory)], check=True)
        return f"tmpfs remounted {mode}"
    if writable:
        directory.unlink()
        return "the file in place of the directory removed"
    shutil.rmtree(directory)  # not root-proof otherwise: a file where the directory was
    directory.write_text("")
    return "directory replaced by a file"


def metric_sums(text: str, name: str) -> dict[str, float]:
    """``name``'s samples summed per ``reason`` tag (``""`` when it has none)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            reason = re.search(r'reason="([^"]*)"', line)
            key = reason.group(1) if reason else ""
            sums[key] = sums.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def file_rows(directory: Path) -> tuple[int, int, int]:
    """Rows, files and bytes of the traffic log under ``directory``."""
    from rldiff.data.traffic import FILE_GLOB, read_traffic

    if not directory.is_dir():
        return 0, 0, 0
    files = list(directory.glob(FILE_GLOB))
    return read_traffic(directory).num_rows, len(files), sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--flush-s", type=float, default=2.0, help="traffic_log_flush_s")
    parser.add_argument("--readonly-after", type=float, help="seconds into the load")
    parser.add_argument("--writable-after", type=float, help="seconds into the load")
    args = parser.parse_args()

    import requests
    import torch

    torch.set_num_threads(1)
    import ray
    from ray import serve

    from rldiff.rl.untrained import untrained_policy
    from rldiff.serving.app import build_app, cluster_env

    tmp = Path(tempfile.mkdtemp(prefix="bench_traffic_"))
    log_dir = tmp / "log"
    log_dir.mkdir()
    mounted = mount_tmpfs(log_dir)
    print(f"log directory: {log_dir} ({'a tmpfs' if mounted else 'no mount: a plain directory'})")
    untrained_policy(tmp / "policy", "gmm", (args.budget,))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    http = requests.Session()
    cluster_env()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    events: list[str] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {
            "model": "gmm",
            "policy": "policy",
            "policy_root": str(tmp),
            "access_log": False,
            "traffic_log": str(log_dir),
            "traffic_log_flush_s": args.flush_s,
        }
        serve.run(
            build_app(options),
            name="rldiff",
            route_prefix="/",
            logging_config={"enable_access_log": False},
        )
        start = time.monotonic()

        def at(seconds: float, writable: bool) -> None:
            time.sleep(max(0.0, seconds - (time.monotonic() - start)))
            how = set_writable(log_dir, writable, mounted)
            events.append(f"{time.monotonic() - start:5.1f} s: {how}")

        def watch_health(stop: threading.Event) -> None:
            last = None
            while not stop.wait(1.0):
                try:
                    health = http.get(base + "/v1/health", timeout=10).json()
                except (requests.RequestException, ValueError) as err:
                    events.append(f"health failed: {err}")
                    continue
                now = (health["status"], health["traffic_log"]["state"])
                if now != last:
                    events.append(
                        f"{time.monotonic() - start:5.1f} s: health {now[0]}, log {now[1]}"
                    )
                    last = now

        timers = []
        if args.readonly_after is not None:
            timers.append(threading.Thread(target=at, args=(args.readonly_after, False)))
        if args.writable_after is not None:
            timers.append(threading.Thread(target=at, args=(args.writable_after, True)))
        stop = threading.Event()
        watcher = threading.Thread(target=watch_health, args=(stop,))
        for t in [*timers, watcher]:
            t.start()
        load = concurrent(base + "/v1/generate", args.clients, 0, args.budget, args.seconds)
        for t in timers:
            t.join()
        served, failed = len(load["batches"]), len(load["errors"])
        latencies = load["latencies"]
        print(
            f"{args.clients} clients for {load['seconds']:.1f} s: {served} requests served, "
            f"{failed} failed; latency p50 {percentile(latencies, 0.5) * 1e3:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1e3:.1f} ms"
        )
        deadline = time.monotonic() + 3 * args.flush_s + 5  # the last rows reach the disk
        while time.monotonic() < deadline:
            log = http.get(base + "/v1/health", timeout=10).json()["traffic_log"]
            if log["rows_written"] + log["rows_dropped"] == served and not log["rows_pending"]:
                break
            time.sleep(0.5)
        stop.set()
        watcher.join()
        health = http.get(base + "/v1/health", timeout=10).json()
        log = health["traffic_log"]
        print(
            f"health: {health['status']} ({health['reason']}); traffic log {log['state']}: "
            f"{log['rows_written']} rows written in {log['files_written']} files, "
            f"{log['rows_pending']} pending, {log['rows_dropped']} dropped"
        )
        rows, files, size = file_rows(log_dir)
        print(f"Parquet files: {rows} rows in {files} files, {size / 1024:.0f} KiB")
        metrics: dict = {}
        for _ in range(20):  # Ray exports every few seconds
            text = http.get(base + "/metrics", timeout=30).text
            metrics = {
                "written": metric_sums(text, "ray_rldiff_traffic_rows_written_total"),
                "dropped": metric_sums(text, "ray_rldiff_traffic_rows_dropped_total"),
                "failing": metric_sums(text, "ray_rldiff_traffic_log_failing"),
            }
            exported = sum(metrics["written"].values()) + sum(metrics["dropped"].values())
            if exported == log["rows_written"] + log["rows_dropped"]:
                break
            time.sleep(2)
        print(
            f"/metrics: rows written {sum(metrics['written'].values()):.0f}, dropped "
            f"{ {k: int(v) for k, v in metrics['dropped'].items()} or 0 }, failing gauge "
            f"{sum(metrics['failing'].values()):.0f}"
        )
        for event in events:
            print(f"  {event}")
    finally:
        serve.shutdown()  # the ingress closes its log: a last write of what it holds
        ray.shutdown()
    rows, files, size = file_rows(log_dir)
    print(
        f"after shutdown: {rows} rows in the files; requests served {served}; "
        f"rows == served: {rows == served}; rows not written: {served - rows}"
    )
    if mounted:
        subprocess.run(["umount", str(log_dir)], check=False)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
