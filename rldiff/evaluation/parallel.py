"""Runs independent jobs in-process, or as Ray tasks when a Ray cluster is there."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

RAY_MODES = ("auto", "local", "off")


def connect_ray(mode: str) -> bool:
    """``off``: no Ray. ``local``: start a local Ray on this machine's cores (loopback only).
    ``auto``: use a running Ray, or the cluster named by ``RAY_ADDRESS``; otherwise no Ray."""
    if mode not in RAY_MODES:
        raise ValueError(f"ray mode must be one of {RAY_MODES}, got {mode!r}")
    if mode == "off":
        return False
    import ray

    if ray.is_initialized():
        return True
    if mode == "auto" and not os.environ.get("RAY_ADDRESS"):
        return False
    if mode == "local":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1 only
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    return True


def use_tasks(mode: str, denoiser) -> bool:
    """Whether jobs on ``denoiser`` run as Ray tasks: when ``mode`` connects to Ray and the model
    sits on the CPU. Tasks ask for one CPU each, so a model on this process's GPU runs its jobs
    here, on the GPU, instead."""
    on_gpu = getattr(denoiser, "device", torch.device("cpu")).type == "cuda"
    return connect_ray(mode) and not on_gpu


def parallel_map(fn: Callable, items: Sequence, context, use_ray: bool, desc: str) -> list:
    """``[fn(item, context) for item in items]`` with a progress bar; Ray tasks when ``use_ray``."""
    if not use_ray:
        return [fn(item, context) for item in tqdm(items, desc=desc, leave=False)]
    import ray

    remote = ray.remote(num_cpus=1)(_in_one_thread(fn))
    context_ref = ray.put(context)
    futures = [remote.remote(item, context_ref) for item in items]
    index = {f: i for i, f in enumerate(futures)}
    results = [None] * len(futures)
    pending = list(futures)
    with tqdm(total=len(futures), desc=desc, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[index[done[0]]] = ray.get(done[0])
            bar.update(1)
    return results


def _in_one_thread(fn: Callable) -> Callable:
    def run(item, context):
        import torch

        torch.set_num_threads(1)
        return fn(item, context)

    run.__name__ = fn.__name__
    return run
