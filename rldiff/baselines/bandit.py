"""The classic baseline: an epsilon-greedy bandit router over the experts, fixed step rule.

Arms are experts; a context is (budget, step index). Every arm steps around the base schedule
(``BaseSchedule``: per-budget sigmas or the logSNR split, zero step actions; noise amount 1 for the
stochastic expert), so only the expert per step is learned. Training runs the shared sampler on
batches of training samples, choosing arms epsilon-greedily per context, and credits every arm a
sample chose with that sample's final reward (``rldiff.core.routing.reward`` against the base run from the
same noise); an arm's value is the running mean of its credits in that context.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rldiff.core.error import rmse_per_sample
from rldiff.core.policies import Decision, Observation
from rldiff.core.routing import (
    BaseSchedule,
    BaseSchedulePolicy,
    decision_from_actions,
    experts_in_use,
    reward,
)
from rldiff.core.sampler import sample
from rldiff.core.solvers import EXPERT_NAMES


class BanditPolicy:
    """Greedy arm per (budget, step): ``values`` / ``counts`` are ``[budgets, steps, arms]``."""

    name = "bandit"

    def __init__(self, budgets, values, counts, base: BaseSchedule, epsilon: float, experts=None):
        self.budgets = np.asarray(sorted({int(b) for b in budgets}))
        self.values = np.asarray(values, dtype=np.float64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.arms = experts_in_use(experts)  # arm j -> global expert index
        self.base, self.epsilon = base, float(epsilon)

    @classmethod
    def empty(cls, budgets, base: BaseSchedule, epsilon: float, experts=None) -> BanditPolicy:
        shape = (len(set(budgets)), int(max(budgets)), len(experts_in_use(experts)))
        return cls(budgets, np.zeros(shape), np.zeros(shape, np.int64), base, epsilon, experts)

    def contexts(self, budget, step) -> tuple[np.ndarray, np.ndarray]:
        """Table rows of (budget, step): the nearest trained budget, the last step row at most."""
        budget = np.asarray(budget).reshape(-1, 1)
        b = np.abs(self.budgets[None] - budget).argmin(1)
        return b, np.minimum(np.asarray(step).reshape(-1), self.values.shape[1] - 1)

    def greedy(self, obs: Observation) -> np.ndarray:
        return self.values[self.contexts(obs.budget.numpy(), obs.step.numpy())].argmax(1)

    def decide(self, obs: Observation, arm: np.ndarray) -> Decision:
        """The fixed step rule with the experts of ``arm``; noise amount 1 (a stochastic expert)."""
        actions = np.zeros((len(arm), 2))
        actions[:, 1] = 1.0
        decision = decision_from_actions(obs, np.asarray(self.arms)[arm], actions, self.base)
        k = len(self.arms)
        decision.confidence = torch.full((len(arm),), 1 - self.epsilon + self.epsilon / k).double()
        return decision

    def act(self, obs: Observation) -> Decision:
        return self.decide(obs, self.greedy(obs))

    def credit(self, steps, budget: torch.Tensor, r: torch.Tensor) -> None:
        """Adds ``r[i]`` to every (budget, step, arm) sample ``i`` went through (``StepRecord``s)."""
        arm_of = np.full(max(self.arms) + 1, -1)
        arm_of[self.arms] = np.arange(len(self.arms))
        rows = np.concatenate([rec.rows.cpu().numpy() for rec in steps])
        step = np.concatenate([np.full(len(rec.rows), t) for t, rec in enumerate(steps)])
        arm = arm_of[torch.cat([rec.expert for rec in steps]).numpy()]
        at = (*self.contexts(budget.numpy()[rows], step), arm)
        sums, hits = np.zeros_like(self.values), np.zeros_like(self.counts)
        np.add.at(sums, at, r.numpy()[rows])
        np.add.at(hits, at, 1)
        self.counts += hits  # running means
        self.values += (sums - hits * self.values) / np.maximum(self.counts, 1)

    def save(self, path) -> None:
        sched = self.base.schedules
        sched = None if sched is None else {b: s.tolist() for b, s in sched.items()}
        d = {"budgets": self.budgets.tolist(), "experts": [EXPERT_NAMES[k] for k in self.arms]}
        d |= {"epsilon": self.epsilon, "values": self.values.tolist()}
        d |= {
            "counts": self.counts.tolist(),
            "schedules": sched,
            "step_range": self.base.step_range,
        }
        Path(path).write_text(json.dumps(d))

    @classmethod
    def load(cls, path) -> BanditPolicy:
        d = json.loads(Path(path).read_text())
        base = BaseSchedule.make(d["schedules"], d["step_range"])
        return cls(d["budgets"], d["values"], d["counts"], base, d["epsilon"], d["experts"])


class _Exploring:
    """The bandit with probability ``epsilon`` of a uniformly random arm per sample and step."""

    def __init__(self, bandit: BanditPolicy, rng: np.random.Generator):
        self.bandit, self.rng, self.name = bandit, rng, "bandit-explore"

    def act(self, obs: Observation) -> Decision:
        arm = self.bandit.greedy(obs)
        explore = self.rng.random(len(arm)) < self.bandit.epsilon
        arm[explore] = self.rng.integers(len(self.bandit.arms), size=int(explore.sum()))
        return self.bandit.decide(obs, arm)


def train_bandit(
    denoiser,
    reference: torch.Tensor,
    noise: torch.Tensor,
    cond,
    budgets,
    base: BaseSchedule | None = None,
    rounds: int = 20,
    epsilon: float = 0.1,
    seed: int = 0,
    *,
    experts=None,
    base_expert: str = "unipc",
    batch_size: int = 64,
    seeds=None,
    cost_per_nfe: float = 0.0,
) -> BanditPolicy:
    """Trains on the TRAINING samples ``noise`` [N, ...] (unit), ``cond`` [N], ``reference`` [N, ...]
    (``seeds`` [N] seed their stochastic steps, default 0..N-1); each round draws ``batch_size``
    samples and a budget per sample from ``budgets``."""
    base = base or BaseSchedule()
    n, rng = len(noise), np.random.default_rng(seed)
    seeds = np.arange(n) if seeds is None else np.asarray(seeds, dtype=np.int64)
    bandit = BanditPolicy.empty(budgets, base, epsilon, experts)
    explorer, base_policy = _Exploring(bandit, rng), BaseSchedulePolicy(base_expert, base)
    base_rmse = {}  # (sample, budget) -> RMSE of the base run from the same noise
    for _ in range(rounds):
        idx = torch.as_tensor(rng.choice(n, batch_size, replace=n < batch_size))
        budget = torch.as_tensor(rng.choice(list(budgets), batch_size), dtype=torch.long)
        keys = list(zip(idx.tolist(), budget.tolist(), strict=True))
        miss = sorted({k for k in keys if k not in base_rmse})
        if miss:
            m, mb = torch.tensor([i for i, _ in miss]), torch.tensor([b for _, b in miss])
            run = sample(denoiser, base_policy, noise[m], cond[m], mb, seeds[m.numpy()].tolist())
            base_rmse.update(zip(miss, rmse_per_sample(run.x0, reference[m]).tolist(), strict=True))
        run = sample(denoiser, explorer, noise[idx], cond[idx], budget, seeds[idx.numpy()].tolist())
        rmse = rmse_per_sample(run.x0, reference[idx])
        rb = torch.tensor([base_rmse[k] for k in keys], dtype=torch.float64)
        bandit.credit(run.steps, budget, reward(rmse, rb, run.nfe, cost_per_nfe))
    return bandit
