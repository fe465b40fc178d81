"""Routing semantics, torch only: what a router's and an expert's actions mean, what they observe,
and the reward they share. The RLlib env (``rldiff.rl.env``), the bandit, the learned policy and the
service all act through these functions, so a decision means the same everywhere.

- ``BaseSchedule``: the schedule each expert steps around (per-budget sigmas, or the budget-aware
  logSNR split); ``BaseSchedulePolicy`` is it as a ``Policy`` (one expert, zero actions).
- ``decision_from_actions``: expert choices ``[b]`` and expert actions ``[b, 2]`` in [-1, 1]
  (step scale, noise amount) to the sampler's ``Decision``; zero actions reproduce the base.
- ``observation_vector``: the ``[b, OBS_DIM]`` features every module sees (layout
  ``OBS_LAYOUT_VERSION``).
- ``reward``: ``clip(log(rmse_base / rmse), -2, 2) - cost_per_nfe * nfe`` per sample.
- ``experts_in_use``: expert names to global expert indices (router action ``j`` -> ``experts[j]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rldiff.core.denoisers import UNCONDITIONAL
from rldiff.core.policies import Decision, Observation, budget_log_step
from rldiff.core.solvers import EXPERTS, expert_index

N_EXPERTS = len(EXPERTS)  # the router chooses among these solvers
REWARD_CLIP = 2.0  # |log(rmse_base / rmse)| cap: a few outliers cannot dominate
COST_SCALE = 50.0  # the cost feature is cost_per_nfe * 50 (1.0 at a cost of 0.02 per NFE)
OBS_DIM = 8 + (N_EXPERTS + 1) + 11 + 2
# Bump when observation_vector changes meaning: a policy trained on another layout would act on
# the wrong features without any error.
OBS_LAYOUT_VERSION = 2  # 2: six experts (iPNDM), router actions relative to the table


STEP_RANGE = 1.5  # a step action of +-1 scales the base log-step by STEP_RANGE^+-1


@dataclass(frozen=True)
class BaseSchedule:
    """The base schedule each expert's step action scales around. Three forms:

    - none: the budget-aware logSNR split, for every expert;
    - ``schedules``: per-budget sigmas (decreasing, ending in 0), one for every expert;
    - ``own``: each expert's own sigmas per (budget, guidance) (``OwnSchedule`` entries, as the
      evaluation protocol optimises them), with ``table`` (budget, guidance) -> the expert whose
      schedule had the lowest training RMSE: the conditional table. An expert steps around its own
      schedule (an expert without one, around the table's); a guidance scale not listed takes the
      nearest one; a budget not listed is an error.

    ``step_range`` is the factor a step action of +-1 scales the base log-step by."""

    schedules: dict[int, torch.Tensor] | None = None  # budget -> decreasing sigmas ending in 0
    step_range: float = STEP_RANGE
    own: dict[tuple[int, int, float], torch.Tensor] | None = None  # (expert, budget, guidance)
    table: dict[tuple[int, float], int] | None = None  # (budget, guidance) -> expert

    @classmethod
    def make(cls, schedules=None, step_range: float = STEP_RANGE) -> BaseSchedule:
        """Accepts JSON-ish input: ``{budget: sigmas}`` (string budget keys allowed), or a list of
        ``{"solver", "budget", "guidance", "sigmas", "train_rmse"}`` entries (own schedules)."""
        if isinstance(schedules, list | tuple):
            own, best = {}, {}
            for e in schedules:
                key = (expert_index(e["solver"]), int(e["budget"]), float(e["guidance"]))
                own[key] = torch.as_tensor(e["sigmas"], dtype=torch.float64)
                where = key[1:]
                if where not in best or e["train_rmse"] < best[where][1]:
                    best[where] = (key[0], float(e["train_rmse"]))
            table = {where: expert for where, (expert, _) in best.items()}
            return cls(None, float(step_range), own, table)
        if schedules is not None:
            schedules = {
                int(b): torch.as_tensor(s, dtype=torch.float64) for b, s in schedules.items()
            }
        return cls(schedules, float(step_range))

    def table_experts(self, obs: Observation) -> torch.Tensor | None:
        """The table's expert per sample (None without own schedules)."""
        if self.table is None:
            return None
        return torch.tensor(
            [
                self.table[self._where(b, g)]
                for b, g in zip(obs.budget.tolist(), obs.guidance.tolist(), strict=True)
            ],
            dtype=torch.long,
        )

    def sigma_next(self, obs: Observation, experts=None) -> torch.Tensor:
        """Each sample's base next sigma (for ``experts`` [b] where each has its own schedule;
        None: the table's expert): 0 (a jump) once no NFE remains."""
        remaining = (obs.budget - obs.nfe).clamp_min(0).to(torch.float64)
        if self.own is not None:
            nxt = self._own_next(obs, experts)
        elif self.schedules is None:  # the budget-aware logSNR split (AdaptivePolicy's floor)
            span, h = budget_log_step(obs)
            nxt = torch.where(span > 0, obs.sigma * torch.exp(-h), 0.0)
        else:  # one base step further along the schedule than where the sample is now
            nxt = torch.zeros_like(obs.sigma)
            for b in obs.budget.unique().tolist():
                if b not in self.schedules:
                    raise KeyError(
                        f"no base schedule for budget {b}: have {sorted(self.schedules)}"
                    )
                rows = obs.budget == b
                nxt[rows] = one_step_along(self.schedules[b], obs.sigma[rows])
        return torch.where(remaining > 0, nxt, torch.zeros_like(nxt))

    def _where(self, budget: int, guidance: float) -> tuple[int, float]:
        scales = [g for b, g in self.table if b == budget]
        if not scales:
            have = sorted({b for b, _ in self.table})
            raise KeyError(f"no base schedule for budget {budget}: have {have}")
        return budget, min(scales, key=lambda g: abs(g - guidance))

    def _own_next(self, obs: Observation, experts) -> torch.Tensor:
        table = self.table_experts(obs)
        experts = table if experts is None else torch.as_tensor(experts, dtype=torch.long)
        nxt = torch.zeros_like(obs.sigma)
        keys = torch.stack(
            [experts.double(), obs.budget.double(), obs.guidance.double().cpu(), table.double()], 1
        )
        for expert, budget, guidance, fallback in keys.unique(dim=0).tolist():
            rows = (keys == torch.tensor([expert, budget, guidance, fallback])).all(1)
            where = self._where(int(budget), guidance)
            sigmas = self.own.get((int(expert), *where), self.own[(int(fallback), *where)])
            nxt[rows] = one_step_along(sigmas, obs.sigma[rows])
        return nxt


def one_step_along(table: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The sigma one step after each ``sigma``'s fractional position on the schedule ``table``
    (decreasing, ending in 0), interpolating log sigma: a sample on a schedule point moves to the
    next point exactly; one between points keeps its fraction, instead of taking a tiny step to the
    next point below it. A sample between the last two points moves to the last one; one past the
    last point jumps to 0."""
    points = table[:-1]  # the interior points, all > 0
    n = len(points)
    log_p, log_s = points.log(), sigma.log()
    i = ((points[None] >= sigma[:, None] * (1 - 1e-12)).sum(1) - 1).clamp(0, n - 1)
    inside = i + 1 < n  # between points[i] and points[i + 1], not past the last one
    gap = log_p[i] - log_p[(i + 1).clamp_max(n - 1)]
    frac = torch.where(inside, ((log_p[i] - log_s) / gap.where(inside, 1.0)).clamp(0, 1), 1.0)
    j = i + 1  # the target lies frac of the way from points[j] to points[j + 1]
    on_point = (frac == 0) & (j < n)
    between = (frac > 0) & (j + 1 < n)
    lo, hi = log_p[j.clamp_max(n - 1)], log_p[(j + 1).clamp_max(n - 1)]
    out = torch.where(between, torch.exp(lo - frac * (lo - hi)), torch.zeros_like(sigma))
    last = (frac > 0) & (j + 1 == n) & inside  # not past the last point yet: stop on it
    return torch.where(on_point | last, points[j.clamp_max(n - 1)], out)


def experts_in_use(names=None) -> list[int]:
    """Global expert indices of ``names`` (None: all, in ``EXPERTS`` order)."""
    if names is None:
        return list(range(N_EXPERTS))
    if isinstance(names, str):
        names = [names]
    out = [expert_index(n) for n in names]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"experts must be distinct names, at least one: got {names!r}")
    return out


def routed_experts(obs: Observation, choices, experts: list[int], base: BaseSchedule):
    """The expert of each router action ``j``: ``experts[(anchor + j) % len(experts)]``, where the
    anchor is the position among ``experts`` of the table's expert for the sample's budget and
    guidance (``BaseSchedule.table_experts``; 0 without own schedules, or where that expert is not
    in play). So action 0 is always the conditional table's choice, and a router warm-started on
    action 0 starts as the table, in every condition; without own schedules action j is
    ``experts[j]``."""
    choices = torch.as_tensor(np.asarray(choices), dtype=torch.long).reshape(-1)
    anchor = torch.zeros_like(choices)
    table = base.table_experts(obs)
    if table is not None:
        position = {e: i for i, e in enumerate(experts)}
        anchor = torch.tensor([position.get(e, 0) for e in table.tolist()], dtype=torch.long)
    return torch.as_tensor(experts, dtype=torch.long)[(anchor + choices) % len(experts)]


def decision_from_actions(obs: Observation, experts, actions, base: BaseSchedule) -> Decision:
    """The sampler decision for expert choices ``experts`` [b] and expert actions ``[b, 2]``.

    ``actions[:, 0]`` scales the base log-step: ``h = h_base * step_range ** a`` (``h_base`` is the
    distance to sigma_min when the base jumps to 0); the sample jumps to 0 when the step passes
    below both sigma_min and the base point, or no NFE remains, or it is at sigma_min already.
    ``actions[:, 1]`` gives the noise amount ``eta = (a + 1) / 2`` of a stochastic expert (0 for
    the others). Zero actions reproduce the base schedule exactly (``sigma_next = base * exp(-0)``).
    """
    experts = torch.as_tensor(np.asarray(experts), dtype=torch.long).reshape(-1)
    a = torch.as_tensor(np.asarray(actions), dtype=torch.float64).reshape(-1, 2).clamp(-1, 1)
    base_next = base.sigma_next(obs, experts)
    span = (obs.sigma / obs.sigma_min).log().clamp_min(0)
    jump = base_next <= 0
    h_base = torch.where(jump, span, (obs.sigma / base_next.clamp_min(1e-300)).log())
    dh = h_base * torch.expm1(a[:, 0] * math.log(base.step_range))  # h - h_base
    nxt = torch.where(jump, obs.sigma * torch.exp(-(h_base + dh)), base_next * torch.exp(-dh))
    floor = base_next.clamp(max=obs.sigma_min)  # below this, the step is a jump to 0
    finish = (obs.budget <= obs.nfe) | (jump & ((a[:, 0] >= 0) | (span <= 0))) | (nxt < floor)
    stochastic = torch.tensor([e.stochastic for e in EXPERTS])[experts]
    eta = torch.where(stochastic, (a[:, 1] + 1) / 2, torch.zeros_like(a[:, 1]))
    return Decision(experts, torch.where(finish, torch.zeros_like(nxt), nxt), eta)


class BaseSchedulePolicy:
    """The base schedule itself as a ``Policy``: zero actions (defines reward 0) of one expert,
    or, with own schedules, of the table's expert for each sample (the conditional table)."""

    def __init__(self, expert: str, base: BaseSchedule):
        self.expert, self.base = expert_index(expert), base
        self.name = "base-schedule:" + ("table" if base.table is not None else expert)

    def act(self, obs: Observation) -> Decision:
        b = len(obs.index)
        experts = self.base.table_experts(obs)
        experts = [self.expert] * b if experts is None else experts
        return decision_from_actions(obs, experts, np.zeros((b, 2)), self.base)


def observation_vector(obs: Observation, base_next: torch.Tensor, cost_per_nfe) -> np.ndarray:
    """Features ``[b, OBS_DIM]`` float32, the same for the router and the experts, in this order:

    0 log sigma normalised to [0, 1] over [sigma_min, sigma_max] (the remaining log-range
    fraction); 1 steps taken / 10;
    2 NFE used (this step's evaluation included) / budget; 3 budget / 10;
    4 the base step's log-range fraction: log(sigma / base next) / log(sigma_max / sigma_min)
    (the remaining fraction when the base jumps to 0); 5 RMS change of the denoised estimate since
    the last step; 6 RMS of the denoised estimate; 7 last log-step / log(sigma_max / sigma_min);
    8..8+N_EXPERTS last expert one-hot (slot N_EXPERTS: none yet); next 11: class one-hot (slot 10: unconditional);
    then guidance scale; then cost per NFE * COST_SCALE.
    """
    total = math.log(obs.sigma_max / obs.sigma_min)
    span = (obs.sigma / obs.sigma_min).log().clamp(0, total)
    step = torch.where(base_next > 0, (obs.sigma / base_next.clamp_min(1e-300)).log(), span)
    b = len(obs.index)
    last = torch.where(obs.last_expert < 0, N_EXPERTS, obs.last_expert)
    label = torch.where(obs.labels == UNCONDITIONAL, 10, obs.labels).cpu()
    cols = [
        span / total,
        obs.step / 10,
        obs.nfe / obs.budget,
        obs.budget / 10,
        step.clamp(0, total) / total,
        obs.denoised_change.clamp_max(10),
        obs.denoised_rms.clamp_max(10),
        obs.last_h / total,
    ]
    out = torch.cat(
        [
            torch.stack([c.to(torch.float64).cpu() for c in cols], 1),
            torch.nn.functional.one_hot(last.cpu(), N_EXPERTS + 1),
            torch.nn.functional.one_hot(label, 11),
            obs.guidance.to(torch.float64).cpu()[:, None],
            torch.as_tensor(cost_per_nfe, dtype=torch.float64).expand(b)[:, None] * COST_SCALE,
        ],
        1,
    )
    return out.numpy().astype(np.float32)


def reward(rmse, rmse_base, nfe, cost_per_nfe) -> torch.Tensor:
    """``clip(log(rmse_base / rmse), -2, 2) - cost_per_nfe * nfe`` per sample."""
    gain = (
        (rmse_base.clamp_min(1e-12) / rmse.clamp_min(1e-12)).log().clamp(-REWARD_CLIP, REWARD_CLIP)
    )
    return gain - torch.as_tensor(cost_per_nfe, dtype=torch.float64) * nfe
