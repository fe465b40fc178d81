"""Runs checked requests (``Job``s) through the one sampler and builds their responses.

Jobs that share a policy (the learned one at any budget; a baseline at one budget) are merged into
one ``rldiff.core.sampler.sample`` run in which every sample follows its own schedule, then split back.
Each sample's noise comes from ``rldiff.core.seeds.initial_noise`` of its seed, so a served sample equals
the evaluation sampler's sample for the same seed, label, guidance, policy and budget.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import torch

from rldiff.core.denoisers import Condition
from rldiff.core.sampler import sample
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERT_NAMES
from rldiff.serving.catalog import Catalog
from rldiff.serving.explain import explain
from rldiff.serving.schemas import Job, RequestProblem, label_problem


def check_job(catalog: Catalog, job: Job) -> RequestProblem | None:
    """Why ``job`` cannot be served here (a label the model lacks, an unknown policy, a budget the
    policy lacks), or None."""
    problem = label_problem(job.labels, catalog.num_classes)
    if problem:
        return RequestProblem(problem, "labels")
    try:
        catalog.resolve(job.policy, job.budget)
    except LookupError as err:
        return RequestProblem(str(err.args[0]), "policy")
    return None


def run_jobs(catalog: Catalog, jobs: list[Job], arrived: list[float] | None = None) -> list[dict]:
    """Serves ``jobs`` (already checked) in as few sampler runs as their policies allow; returns
    one response dict per job, in order. ``arrived``: when each job reached the sampler
    (``time.perf_counter``), for the queue time."""
    start = time.perf_counter()
    arrived = arrived or [start] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    resolved = [catalog.resolve(j.policy, j.budget) for j in jobs]
    for i, (_, key, _) in enumerate(resolved):
        groups.setdefault(key, []).append(i)
    out: list[dict | None] = [None] * len(jobs)
    degraded = catalog.degraded
    for members in groups.values():
        name, _, policy = resolved[members[0]]
        run_start = time.perf_counter()
        result = _sample(catalog.denoiser, policy, [jobs[i] for i in members])
        sampler_ms = (time.perf_counter() - run_start) * 1e3
        row = 0
        for i in members:
            job = jobs[i]
            rows = range(row, row + len(job.seeds))
            row += len(job.seeds)
            out[i] = {
                "policy": name,
                "requested_policy": job.policy,
                "degraded": degraded and job.policy == "learned",
                "model": catalog.model,
                "budget": job.budget,
                "samples": [_sample_out(result, r, job, name, k) for k, r in enumerate(rows)],
                "timings": {
                    "queue_ms": (start - arrived[i]) * 1e3,
                    "sampler_ms": sampler_ms,
                    "batch_samples": len(result.nfe),
                },
            }
    return out


def _sample(denoiser, policy, jobs: list[Job]):
    seeds = [s for j in jobs for s in j.seeds]
    labels = [c for j in jobs for c in j.labels]
    guidance = [j.guidance for j in jobs for _ in j.seeds]
    budget = torch.tensor([j.budget for j in jobs for _ in j.seeds])
    device = getattr(denoiser, "device", "cpu")  # the UNet's; the exact mixture runs on the CPU
    noise = initial_noise(seeds, tuple(denoiser.sample_shape)).to(device)
    with torch.no_grad():
        return sample(denoiser, policy, noise, Condition.make(labels, guidance), budget, seeds)


def _sample_out(result, row: int, job: Job, name: str, k: int) -> dict:
    steps = result.schedule(row)
    for step in steps:
        step["expert"] = EXPERT_NAMES[step["expert"]]
    x0 = result.x0[row].detach().cpu()
    out = {
        "seed": job.seeds[k],
        "label": job.labels[k],
        "guidance": job.guidance,
        "nfe": int(result.nfe[row]),
        "shape": list(x0.shape),
        "schedule": steps,
        "explanation": explain(name, steps, int(result.nfe[row]), job.budget),
    }
    if job.output == "array":
        out["array"] = x0.tolist()
    else:
        out["png_base64"] = png_base64(x0)
    return out


def png_base64(x0: torch.Tensor) -> str:
    """A sample in [-1, 1] (``[C, H, W]``, C = 1 or 3) as a base64 8-bit PNG."""
    from PIL import Image

    pixels = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels[0] if len(pixels) == 1 else np.moveaxis(pixels, 0, -1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
