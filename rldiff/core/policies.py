"""The policy protocol and the non-learned policies.

A policy maps a batch of observations (one row per unfinished sample) to a ``Decision``: which
expert solver steps each sample, to which sigma, with how much fresh noise. Baselines, hand-written
controllers and learned modules all implement it, so they are compared and served through the same
sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rldiff.core.solvers import EXPERTS, expert_index


@dataclass
class Observation:
    """Per-sample features of the unfinished samples (every tensor is [b])."""

    index: torch.Tensor  # position in the batch, so a policy may keep per-sample plans
    step: torch.Tensor  # steps taken so far
    sigma: torch.Tensor  # current noise level (float64)
    nfe: torch.Tensor  # evaluations used, this step's included
    budget: torch.Tensor  # hard NFE cap
    denoised_change: torch.Tensor  # RMS change of the denoised estimate since the last step
    denoised_rms: torch.Tensor  # RMS of the denoised estimate
    last_h: torch.Tensor  # log(sigma_prev / sigma) of the last step, 0 before the first
    last_expert: torch.Tensor  # expert of the last step, -1 before the first
    labels: torch.Tensor
    guidance: torch.Tensor
    sigma_min: float
    sigma_max: float


@dataclass
class Decision:
    expert: torch.Tensor  # [b] int64, index into rldiff.core.solvers.EXPERTS
    sigma_next: torch.Tensor  # [b]
    eta: torch.Tensor  # [b] noise amount in [0, 1]; only stochastic experts use it
    confidence: torch.Tensor | None = None  # [b] the policy's probability for its expert choice


class Policy(Protocol):
    name: str

    def act(self, obs: Observation) -> Decision: ...


def budget_log_step(obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(span, h)``: the log-sigma range left down to sigma_min, and its even split over this step
    and one more per remaining evaluation (the last of them a jump to 0): logSNR-uniform spacing
    that never runs out of budget early."""
    remaining = (obs.budget - obs.nfe).clamp_min(0).to(torch.float64)
    span = (obs.sigma / obs.sigma_min).log().clamp_min(0)
    return span, span / (remaining + 1)


class FixedSchedulePolicy:
    """One solver on a fixed schedule: ``sigmas`` [n + 1], or [B, n + 1] for a schedule per sample."""

    def __init__(
        self, solver: str, sigmas: torch.Tensor, eta: float = 0.0, name: str | None = None
    ):
        self.expert = expert_index(solver)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.eta = eta
        self.name = name or f"fixed:{solver}"

    def act(self, obs: Observation) -> Decision:
        table = self.sigmas if self.sigmas.dim() == 2 else self.sigmas.expand(len(obs.index), -1)
        rows = obs.index if self.sigmas.dim() == 2 else torch.arange(len(obs.index))
        nxt_step = (obs.step + 1).clamp_max(table.shape[1] - 1)
        nxt = table[rows, nxt_step]
        nxt = torch.where(obs.step + 1 >= table.shape[1], torch.zeros_like(nxt), nxt)
        b = len(obs.index)
        return Decision(
            torch.full((b,), self.expert, dtype=torch.long), nxt, torch.full((b,), float(self.eta))
        )


class AdaptivePolicy:
    """Per-sample error-controlled step size for a multistep solver, within a hard NFE budget.

    Embedded error estimate: the second-order term of DPM-Solver++(2M) is the local error of the
    first-order step it corrects; for a step of log-size h it is
    ``e(h) = (1 - e^-h) * h / (2 h_last) * |D_i - D_{i-1}|`` (RMS). The controller picks the h with
    ``e(h) = tol`` (Hairer et al., Solving ODEs I, II.4), never smaller than an even split of the
    remaining log-sigma range over the remaining steps (the logSNR-uniform spacing, so the budget is
    never exhausted early), and jumps to sigma = 0 once the step would pass sigma_min.
    """

    def __init__(self, solver: str = "dpmpp-2m", tol: float = 0.01, name: str | None = None):
        self.expert = expert_index(solver)
        self.tol = tol
        self.name = name or f"adaptive:{solver}"

    def act(self, obs: Observation) -> Decision:
        remaining = (obs.budget - obs.nfe).clamp_min(0).to(torch.float64)
        span, h_floor = budget_log_step(obs)
        h = torch.maximum(self._h_for_tolerance(obs), h_floor)
        nxt = obs.sigma * torch.exp(-h)
        finish = (remaining == 0) | (h >= span)
        nxt = torch.where(finish, torch.zeros_like(nxt), nxt)
        b = len(obs.index)
        return Decision(torch.full((b,), self.expert, dtype=torch.long), nxt, torch.zeros(b))

    def _h_for_tolerance(self, obs: Observation) -> torch.Tensor:
        """Solve (1 - e^-h) h = 2 h_last tol / |dD| for h by bisection (the left side increases)."""
        known = (obs.last_h > 0) & (obs.denoised_change > 0)
        target = 2 * obs.last_h * self.tol / obs.denoised_change.clamp_min(1e-12)
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, 30.0)
        for _ in range(50):
            mid = (lo + hi) / 2
            small = (1 - torch.exp(-mid)) * mid < target
            lo, hi = torch.where(small, mid, lo), torch.where(small, hi, mid)
        return torch.where(known, hi, torch.zeros_like(hi))  # 0: defer to the budget split


def fixed_policy(solver: str, schedule: str, budget: int, noise) -> FixedSchedulePolicy:
    """``fixed:<solver>/<schedule>`` with as many steps as the budget allows."""
    from rldiff.core.schedules import get_schedule
    from rldiff.core.solvers import steps_for_budget

    sigmas = get_schedule(schedule, steps_for_budget(solver, budget), noise)
    eta = 1.0 if EXPERTS[expert_index(solver)].stochastic else 0.0  # ancestral sampling proper
    return FixedSchedulePolicy(solver, sigmas, eta=eta, name=f"fixed:{solver}/{schedule}")


class PlanPolicy:
    """A fixed plan per sample of a batch: ``experts`` [B] and ``sigmas`` [B, L] (each row
    decreasing, then zeros: a row's first 0 is its final jump), indexed by batch position."""

    def __init__(self, experts: torch.Tensor, sigmas: torch.Tensor, name: str = "plan"):
        self.expert_of = torch.as_tensor(experts, dtype=torch.long)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.experts = sorted(set(self.expert_of.tolist()))
        self.name = name

    def act(self, obs: Observation) -> Decision:
        step = (obs.step + 1).clamp_max(self.sigmas.shape[1] - 1)
        nxt = self.sigmas[obs.index, step]
        nxt = torch.where(obs.step + 1 >= self.sigmas.shape[1], torch.zeros_like(nxt), nxt)
        b = len(obs.index)
        return Decision(self.expert_of[obs.index], nxt, torch.zeros(b, dtype=torch.float64))
