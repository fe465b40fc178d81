"""A per-budget global schedule optimised offline against the reference (LD3 / GITS-style).

LD3 (Tong et al., 2024) learns the discretisation of a fixed solver by minimising the distance
between its output and the teacher's solution from the same noise; GITS (Chen et al., 2024) searches
the time grid with the teacher as the yardstick. Here the objective is the evaluation metric itself,
the mean RMSE to the reference solution on *training* seeds, minimised over the interior log-sigmas
by derivative-free coordinate search (a budget's schedule has at most ~10 free numbers, and each
objective value is one batched sampler run, so no gradient through the network is needed). The
search starts from the best hand-built schedule for that solver and keeps the schedule strictly
decreasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rldiff.config import SearchConfig
from rldiff.core.error import rmse_per_sample
from rldiff.core.policies import FixedSchedulePolicy
from rldiff.core.sampler import sample
from rldiff.core.schedules import SCHEDULES, get_schedule
from rldiff.core.solvers import steps_for_budget


@dataclass
class OptimisedSchedule:
    solver: str
    budget: int
    sigmas: torch.Tensor
    train_rmse: float
    start_schedule: str
    start_rmse: float
    evaluations: int


def optimise_schedule(
    denoiser,
    solver: str,
    budget: int,
    noise: torch.Tensor,
    cond,
    reference: torch.Tensor,
    config: SearchConfig = SearchConfig(),  # noqa: B008 (frozen)
) -> OptimisedSchedule:
    """Coordinate search over the interior log-sigmas of ``solver``'s schedule for ``budget``."""
    calls = 0

    def loss(sigmas: torch.Tensor) -> float:
        nonlocal calls
        calls += 1
        policy = FixedSchedulePolicy(solver, sigmas)
        x0 = sample(denoiser, policy, noise, cond, budget).x0
        return float(rmse_per_sample(x0, reference).mean())

    n = steps_for_budget(solver, budget)
    starts = {name: get_schedule(name, n, denoiser.noise_table) for name in SCHEDULES}
    start_losses = {name: loss(s) for name, s in starts.items()}
    start = min(start_losses, key=start_losses.get)
    sigmas, best = starts[start].clone(), start_losses[start]
    step = config.initial_step
    for _ in range(config.rounds):
        for i in range(1, n):  # sigmas[0] = sigma_max and sigmas[n] = 0 stay fixed
            for direction in (1.0, -1.0):
                trial = _moved(sigmas, i, direction * step, config.min_gap)
                if trial is None:
                    continue
                value = loss(trial)
                if value < best:
                    sigmas, best = trial, value
                    break
        step /= 2
    return OptimisedSchedule(solver, budget, sigmas, best, start, start_losses[start], calls)


def _moved(sigmas: torch.Tensor, i: int, delta: float, min_gap: float) -> torch.Tensor | None:
    """``sigmas`` with log sigma_i moved by ``delta``, or None if it would break the ordering."""
    trial = sigmas.clone()
    trial[i] = sigmas[i] * torch.exp(torch.tensor(delta, dtype=torch.float64))
    upper_ok = torch.log(trial[i - 1] / trial[i]) >= min_gap
    lower_ok = trial[i + 1] == 0 or torch.log(trial[i] / trial[i + 1]) >= min_gap
    return trial if upper_ok and lower_ok else None
