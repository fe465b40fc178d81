"""Noise schedules: ``n`` steps as ``n + 1`` decreasing sigmas ending in 0.

Each follows its source's convention for the last step: Karras et al. (2022) step from
``sigma_min`` to 0; time-uniform (DDIM's "linspace" spacing, Song et al., 2021) and logSNR-uniform
(DPM-Solver, Lu et al., 2022) spend every step inside the range and jump to 0 from their last
interior point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rldiff.core.noise import DiscreteVP


def karras(n: int, noise: DiscreteVP, rho: float = 7.0) -> torch.Tensor:
    """Eq. (5) of Karras et al. (2022): uniform in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = noise.sigma_min ** (1 / rho), noise.sigma_max ** (1 / rho)
    sigmas = (
        (hi + ramp * (lo - hi)) ** rho
        if n > 1
        else torch.tensor([noise.sigma_max], dtype=torch.float64)
    )
    return _append_zero(sigmas)


def time_uniform(n: int, noise: DiscreteVP) -> torch.Tensor:
    """Uniform in the training timestep from the start timestep down: t = linspace(t_start, 0,
    n + 1) (t_start = T - 1 unless the start is clipped); the final t = 0 becomes 0."""
    t = torch.linspace(noise.t_start, 0, n + 1, dtype=torch.float64)
    return _append_zero(noise.t_to_sigma(t[:-1]))


def logsnr_uniform(n: int, noise: DiscreteVP) -> torch.Tensor:
    """Uniform in log-SNR = -2 log sigma from sigma_max to sigma_min; the final point becomes 0."""
    log_sigma = torch.linspace(
        math.log(noise.sigma_max), math.log(noise.sigma_min), n + 1, dtype=torch.float64
    )
    return _append_zero(log_sigma[:-1].exp())


SCHEDULES: dict[str, Callable[[int, DiscreteVP], torch.Tensor]] = {
    "karras": karras,
    "time-uniform": time_uniform,
    "logsnr-uniform": logsnr_uniform,
}


def get_schedule(name: str, n: int, noise: DiscreteVP) -> torch.Tensor:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    if n < 1:
        raise ValueError(f"a schedule needs at least one step, got {n}")
    return SCHEDULES[name](n, noise)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])
