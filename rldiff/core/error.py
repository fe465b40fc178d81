"""The per-sample error against a reference solution, the quantity every policy is judged by.

Contract: ``rmse_per_sample(x, ref)`` is the RMS difference over all pixels of each sample, on the
[-1, 1] pixel scale, as float64 ``[B]``.
"""

from __future__ import annotations

import torch


def rmse_per_sample(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """RMS over all pixels of ``x - ref`` per sample: float64 ``[B]`` for inputs ``[B, ...]``."""
    if x.shape != ref.shape:
        raise ValueError(
            f"shape mismatch: samples {tuple(x.shape)} vs reference {tuple(ref.shape)}"
        )
    diff = x.detach().to(torch.float64) - ref.detach().to(device=x.device, dtype=torch.float64)
    return diff.flatten(1).pow(2).mean(1).sqrt().cpu()
