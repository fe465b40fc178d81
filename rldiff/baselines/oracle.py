"""An oracle bound (reported, never served): per held-out sample, the best of the table's
candidates, then that sample's own schedule optimised against its own reference.

Candidates: every solver on its schedule optimised for the sample's budget and guidance (the
entries the conditional table chooses among). The per-sample search is the global schedule's
coordinate search (``rldiff.baselines.global_schedule``) run for every sample at once: one batched
sampler run per move, each sample keeping a move only if its own RMSE fell. It needs the reference,
so no policy can reach it; how much of the gap between the table and this bound a learned policy
closes is its capture fraction.
"""

from __future__ import annotations

import torch

from rldiff.config import SearchConfig
from rldiff.core.error import rmse_per_sample
from rldiff.core.policies import PlanPolicy
from rldiff.core.sampler import sample
from rldiff.core.solvers import expert_index


def candidate_plans(candidates: dict[tuple[str, float], list[float]], guidance: torch.Tensor):
    """Per solver, the plan ``(experts [B], sigmas [B, L])`` that gives each sample that solver's
    schedule for its guidance (``candidates``: (solver, guidance) -> sigmas)."""
    solvers = sorted({s for s, _ in candidates})
    length = max(len(v) for v in candidates.values())
    plans = {}
    for solver in solvers:
        sigmas = torch.zeros(len(guidance), length, dtype=torch.float64)
        for i, g in enumerate(guidance.tolist()):
            table = candidates[(solver, g)]
            sigmas[i, : len(table)] = torch.tensor(table, dtype=torch.float64)
        plans[solver] = (torch.full((len(guidance),), expert_index(solver)), sigmas)
    return plans


def oracle_plan(
    denoiser, budget: int, candidates, noise, cond, reference, search: SearchConfig, rounds: int
):
    """The oracle's plan for every sample: ``(experts, sigmas, rmse_of_best_candidate)``."""

    def errors(experts, sigmas) -> torch.Tensor:
        x0 = sample(denoiser, PlanPolicy(experts, sigmas), noise, cond, budget).x0
        return rmse_per_sample(x0, reference).cpu()

    plans = candidate_plans(candidates, cond.guidance.cpu())
    scored = {s: errors(*plan) for s, plan in plans.items()}
    stacked = torch.stack(list(scored.values()))  # [solvers, B]
    best = stacked.argmin(0)
    names = list(scored)
    experts = torch.stack([plans[n][0] for n in names])[best, torch.arange(len(best))]
    sigmas = torch.stack([plans[n][1] for n in names])[best, torch.arange(len(best))]
    candidate_rmse = stacked.min(0).values
    current = candidate_rmse.clone()
    levels = (sigmas > 0).sum(1)  # sigmas[:, 0] = sigma_max and the final 0 stay fixed
    step = search.initial_step
    for _ in range(rounds):
        for i in range(1, sigmas.shape[1] - 1):
            for direction in (1.0, -1.0):
                trial, movable = _moved(sigmas, levels, i, direction * step, search.min_gap)
                if not movable.any():
                    continue
                value = errors(experts, trial)
                better = movable & (value < current)
                sigmas[better], current[better] = trial[better], value[better]
        step /= 2
    return experts, sigmas, candidate_rmse


def _moved(sigmas, levels, i: int, delta: float, min_gap: float):
    """Every sample's schedule with log sigma_i moved by ``delta`` where that keeps it ordered
    (rows where it would not, or that have no level i, are left as they are)."""
    trial = sigmas.clone()
    has = i < levels
    trial[has, i] = sigmas[has, i] * torch.exp(torch.tensor(delta, dtype=torch.float64))
    upper = torch.log(trial[:, i - 1] / trial[:, i].clamp_min(1e-300)) >= min_gap
    below = trial[:, i + 1]
    lower = (below == 0) | (torch.log(trial[:, i] / below.clamp_min(1e-300)) >= min_gap)
    movable = has & upper & lower
    trial[~movable] = sigmas[~movable]
    return trial, movable
