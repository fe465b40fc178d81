"""Per-sample randomness from integer seeds, so a sample is the same alone or inside any batch."""

from __future__ import annotations

import torch

STEP_NOISE_OFFSET = 1 << 40  # step-noise streams never collide with initial-noise streams


def initial_noise(
    seeds, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unit Gaussian noise [len(seeds), *shape], one generator per seed."""
    seeds = [int(s) for s in seeds]
    out = torch.empty(len(seeds), *shape, dtype=dtype)
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return out


def step_generators(seeds) -> list[torch.Generator]:
    """One generator per sample for the noise that stochastic steps inject."""
    return [torch.Generator().manual_seed(int(s) + STEP_NOISE_OFFSET) for s in seeds]
