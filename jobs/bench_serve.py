"""Benchmark: the Serve application against the bare sampler, on 127.0.0.1, embedded model.

Run (from the repository root; about 2-3 minutes on 2 busy cores):

    .venv/bin/python jobs/bench_serve.py [--budget 5] [--requests 200] [--clients 8]
        [--per-client 40 | --seconds S] [--load-only] [--policy-root DIR --policy DIR]

The load test of the service (16 clients for 60 s, one sample at budget 5: errors, throughput,
p50 / p99 latency):

    .venv/bin/python jobs/bench_serve.py --clients 16 --seconds 60 --requests 50 --load-only

Without ``--policy`` it exports an UNTRAINED policy for the embedded model into a temporary
directory (fresh modules, the logSNR split as base schedule): its decisions are meaningless, its cost is a
trained policy's, so the figures are latency and throughput only. It starts a local Ray and Serve
on 127.0.0.1 (access log off) with the Ray settings ``rldiff serve`` uses
(``rldiff.serving.app.cluster_env``), and measures, all with one torch thread:

1. latency of a one-sample ``POST /v1/generate`` (PNG output), one request at a time: p50 / p99
   over ``--requests`` requests after a warm-up;
2. samples/s with ``--clients`` concurrent clients sending one-sample requests (``--per-client``
   each, or for ``--seconds``), their errors and latency p50 / p99: ``@serve.batch`` merges them
   into sampler runs (the mean merged size is printed);
3. the bare sampler's samples/s in this process (same policy, NFE budget and batch size: the
   number of clients), with Serve idle.

It prints the numbers and the ratio serve / bare (target >= 0.7). No asserts. Everything stops
by itself: bounded request counts, and Serve and Ray are shut down at the end.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray socket on 127.0.0.1

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def one_at_a_time(url: str, n: int, budget: int, seed0: int) -> list[float]:
    import requests

    http, times = requests.Session(), []
    for i in range(n):
        start = time.perf_counter()
        r = http.post(url, json={"seeds": [seed0 + i], "labels": i % 10, "budget": budget})
        r.raise_for_status()
        times.append(time.perf_counter() - start)
    return times


def concurrent(
    url: str, clients: int, per_client: int, budget: int, seconds: float | None = None
) -> dict:
    """``clients`` threads sending one-sample requests, ``per_client`` each or, with ``seconds``,
    until that much time has passed (at most 100,000 each): wall seconds, merged batch sizes,
    latencies and failed statuses."""
    import requests

    batches, latencies, errors = [], [], []
    deadline = None if seconds is None else time.perf_counter() + seconds
    count = per_client if seconds is None else 100_000

    def client(c: int):
        http = requests.Session()
        for i in range(count):
            if deadline is not None and time.perf_counter() >= deadline:
                break
            body = {"seeds": [100_000 + c * 100_000 + i], "labels": (c + i) % 10, "budget": budget}
            sent = time.perf_counter()
            try:
                r = http.post(url, json=body, timeout=60)
            except requests.RequestException as err:
                errors.append(type(err).__name__)
                continue
            if r.status_code != 200:
                errors.append(r.status_code)
                continue
            latencies.append(time.perf_counter() - sent)
            batches.append(r.json()["timings"]["batch_samples"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"  {len(errors)} failed requests: {sorted(set(map(str, errors)))}")
    wall = time.perf_counter() - start
    return {"seconds": wall, "batches": batches, "latencies": latencies, "errors": errors}


def bare_sampler(policy, batch: int, budget: int, repeats: int) -> float:
    """Samples/s of ``rldiff.core.sampler.sample`` at ``batch`` samples and ``budget`` NFE."""
    from rldiff.core.denoisers import Condition, labels_for_seeds
    from rldiff.core.sampler import sample
    from rldiff.core.seeds import initial_noise
    from rldiff.data.models import load_model

    denoiser = load_model("embedded")
    seeds = list(range(200_000, 200_000 + batch))
    noise = initial_noise(seeds, tuple(denoiser.sample_shape))
    cond = Condition.make(labels_for_seeds(seeds, denoiser.num_classes))
    with torch.no_grad():
        sample(denoiser, policy, noise, cond, budget, seeds)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            sample(denoiser, policy, noise, cond, budget, seeds)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="one-at-a-time requests")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=40, help="bare sampler runs")
    parser.add_argument(
        "--seconds", type=float, help="clients send for this long instead of --per-client each"
    )
    parser.add_argument(
        "--load-only", action="store_true", help="only the concurrent clients (no bare sampler)"
    )
    parser.add_argument(
        "--batch-wait-s", type=float, default=None, help="the service's batch_wait_s"
    )
    parser.add_argument("--policy-root", help="root of --policy (default: a temporary one)")
    parser.add_argument("--policy", help="an exported policy for the embedded model")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray
    from ray import serve

    from rldiff.baselines.learned import LearnedPolicy
    from rldiff.rl.untrained import untrained_policy
    from rldiff.serving.app import build_app, cluster_env

    tmp = tempfile.TemporaryDirectory()
    root, policy = args.policy_root, args.policy
    if policy is None:
        root, policy = tmp.name, "untrained"
        untrained_policy(Path(root) / policy, "embedded", (args.budget,))
        print("policy: UNTRAINED (fresh modules): latency and throughput only")
    print(f"service batch_wait_s: {args.batch_wait_s or 'default'}")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/generate"
    print(f"Ray cluster settings (as rldiff serve sets them): {cluster_env()}")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"model": "embedded", "policy": policy, "policy_root": root, "access_log": False}
        if args.batch_wait_s is not None:
            options["batch_wait_s"] = args.batch_wait_s
        app = build_app(options)
        serve.run(app, name="rldiff", route_prefix="/", logging_config={"enable_access_log": False})
        one_at_a_time(url, 20, args.budget, 0)  # warm-up
        times = one_at_a_time(url, args.requests, args.budget, 1000)
        print(
            f"one-sample /v1/generate, budget {args.budget}, {args.requests} requests one at a "
            f"time: p50 {percentile(times, 0.5) * 1e3:.1f} ms, "
            f"p99 {percentile(times, 0.99) * 1e3:.1f} ms"
        )
        load = concurrent(url, args.clients, args.per_client, args.budget, args.seconds)
        batches, latencies = load["batches"], load["latencies"]
        served = len(batches) / load["seconds"]
        print(
            f"{args.clients} concurrent clients: {served:.1f} samples/s "
            f"({len(batches)} samples in {load['seconds']:.1f} s, {len(load['errors'])} errors; "
            f"latency p50 {percentile(latencies, 0.5) * 1e3:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1e3:.1f} ms; merged sampler runs of "
            f"{statistics.mean(batches):.1f} samples on average)"
        )
        if args.load_only:
            return
        learned = LearnedPolicy.load(Path(root) / policy)
        bare = bare_sampler(learned, args.clients, args.budget, args.repeats)
        print(
            f"bare sampler, batch {args.clients}, budget {args.budget}: {bare:.1f} samples/s; "
            f"serve / bare = {served / bare:.2f} (target >= 0.7)"
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()


if __name__ == "__main__":
    main()
