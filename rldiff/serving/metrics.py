"""Prometheus metrics of the service, through Ray Serve's metrics API (``ray.serve.metrics``).

Ray exports them on each node's metrics port with the ``ray_`` prefix (e.g.
``ray_rldiff_requests_total``), tagged with the deployment and replica. Created in the replicas.
"""

from __future__ import annotations

LATENCY_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
NFE = [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128]


class IngressMetrics:
    """Requests by route and status, and their latency."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(
            "rldiff_requests_total",
            "HTTP requests by route and status",
            tag_keys=("route", "status"),
        )
        self.latency = Histogram(
            "rldiff_request_latency_ms",
            "time from receipt to response",
            boundaries=LATENCY_MS,
            tag_keys=("route",),
        )

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds * 1e3, tags={"route": route})


class SamplerMetrics:
    """Samples, NFE per sample and expert steps by policy; sampler run sizes; swaps; degraded."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.samples = Counter(
            "rldiff_samples_total", "samples generated", tag_keys=("policy", "degraded")
        )
        self.nfe = Histogram(
            "rldiff_nfe_per_sample", "network evaluations per sample", boundaries=NFE,
            tag_keys=("policy",),
        )  # fmt: skip
        self.experts = Counter(
            "rldiff_expert_steps_total", "sampler steps by expert", tag_keys=("policy", "expert")
        )
        self.batch = Histogram(
            "rldiff_batch_samples", "samples per merged sampler run", boundaries=BATCH
        )
        self.swaps = Counter("rldiff_policy_swaps_total", "policy loads", tag_keys=("ok",))
        self.degraded = Gauge("rldiff_degraded", "1 while no learned policy is loaded")

    def record(self, response: dict) -> None:
        from collections import Counter

        policy, degraded = response["policy"], str(response["degraded"]).lower()
        samples = response["samples"]
        self.samples.inc(len(samples), tags={"policy": policy, "degraded": degraded})
        for sample in samples:
            self.nfe.observe(sample["nfe"], tags={"policy": policy})
        steps = Counter(step["expert"] for sample in samples for step in sample["schedule"])
        for expert, count in steps.items():
            self.experts.inc(count, tags={"policy": policy, "expert": expert})

    def record_batch(self, samples: int) -> None:
        self.batch.observe(samples)

    def record_swap(self, ok: bool, degraded: bool) -> None:
        self.swaps.inc(tags={"ok": str(ok).lower()})
        self.set_degraded(degraded)

    def set_degraded(self, degraded: bool) -> None:
        self.degraded.set(1 if degraded else 0)


class TrafficLogMetrics:
    """The traffic log (``rldiff.serving.traffic_log``): rows written, rows dropped by reason,
    and whether it is failing. Called from the log's writer thread."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge

        self.rows = Counter("rldiff_traffic_rows_written_total", "traffic log rows written")
        self.drops = Counter(
            "rldiff_traffic_rows_dropped_total",
            "traffic log rows dropped: buffer_full, a write error (EROFS, ENOSPC, ...) while "
            "the buffer was full, shutdown, invalid",
            tag_keys=("reason",),
        )
        self.failing = Gauge("rldiff_traffic_log_failing", "1 while traffic log writes fail")

    def written(self, n: int) -> None:
        self.rows.inc(n)

    def dropped(self, n: int, reason: str) -> None:
        self.drops.inc(n, tags={"reason": reason})

    def set_failing(self, failing: bool) -> None:
        self.failing.set(1 if failing else 0)


def cluster_metrics(prefix: str = "ray_rldiff_", timeout_s: float = 5.0) -> str:
    """The service's metrics (names starting with ``prefix``) as Prometheus text, gathered from
    the metrics port of every live node of the Ray cluster (where Ray exports them every few
    seconds) and grouped by metric. A node that does not answer is named in a comment."""
    import urllib.request

    import ray

    texts, missing = [], []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310
                texts.append(answer.read().decode())
        except OSError as err:
            missing.append(f"# {url} did not answer: {type(err).__name__}")
    return "\n".join([*missing, *merge_metrics(texts, prefix)]) + "\n"


def merge_metrics(texts: list[str], prefix: str) -> list[str]:
    """The lines of the metrics named ``prefix...`` in several Prometheus texts, one ``# HELP`` and
    ``# TYPE`` per metric followed by all its samples."""
    comments: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    lines = [line for text in texts for line in text.splitlines()]
    for line in lines:
        parts = line.split()
        if (
            line.startswith(("# HELP ", "# TYPE "))
            and len(parts) > 2
            and parts[2].startswith(prefix)
        ):
            family = comments.setdefault(parts[2], [])
            if line not in family:
                family.append(line)
    for line in lines:
        if line.startswith(prefix):
            name = line.split("{")[0].split()[0]
            family = max((f for f in comments if name.startswith(f)), key=len, default=name)
            samples.setdefault(family, []).append(line)
    out = []
    for family in sorted(set(comments) | set(samples)):
        out += comments.get(family, []) + samples.get(family, [])
    return out
