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
