"""Policies by name: a picklable description of one policy at one budget, built the same way by
the evaluation, the search and the service; and the best of a family per budget in a results table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rldiff.baselines.bandit import BanditPolicy
from rldiff.core.policies import AdaptivePolicy, FixedSchedulePolicy, PlanPolicy, fixed_policy


@dataclass(frozen=True)
class PolicySpec:
    """A picklable description of one policy at one budget."""

    name: str
    family: str  # hand-built | global | table | oracle | adaptive | learned | bandit | model
    solver: str
    budget: int
    schedule: str = ""
    sigmas: tuple[float, ...] = ()
    tol: float = 0.0
    path: str = ""  # learned: an exported policy directory; bandit / table / oracle: its file

    def build(self, noise_table):
        if self.family == "bandit":
            return BanditPolicy.load(self.path)
        if self.family == "table":
            from rldiff.baselines.table import TablePolicy

            return TablePolicy.load(self.path, name=self.name)
        if self.family == "oracle":  # a plan per held-out sample, in the evaluation's order
            plan = torch.load(self.path, weights_only=True)
            return PlanPolicy(plan["experts"], plan["sigmas"], name=self.name)
        if self.family == "learned":
            from rldiff.baselines.learned import LearnedPolicy

            return LearnedPolicy.load(self.path, name=self.name)
        if self.family in ("hand-built", "model"):
            return fixed_policy(self.solver, self.schedule, self.budget, noise_table)
        if self.family == "global":
            return FixedSchedulePolicy(self.solver, torch.tensor(self.sigmas), name=self.name)
        return AdaptivePolicy(self.solver, tol=self.tol, name=self.name)


def best_per_budget(rows: list[dict], family: str) -> dict[int, dict]:
    """The row with the lowest mean reference RMSE per budget within one family."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["family"] == family and (
            r["budget"] not in best or r["rmse_mean"] < best[r["budget"]]["rmse_mean"]
        ):
            best[r["budget"]] = r
    return dict(sorted(best.items()))
