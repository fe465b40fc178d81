"""The routing MDP as an RLlib multi-agent env: one episode samples a batch with the shared sampler.

Agents per sample ``i``: ``router_{i}`` (Discrete(K): which expert solver steps) and
``expert{k}_{i}`` (Box [-1, 1]^2: step size and noise amount, a warm start around a base schedule).
Turn-based: env step A, every unfinished sample's router acts; env step B, each sample's chosen
expert acts, then ``Sampling.advance`` steps the whole batch with one ``Decision`` (and the next
``observe()`` evaluates the denoiser once for all unfinished samples). At a sample's end its router
and every expert that acted on it get ``r = clip(log(rmse_base / rmse), -2, 2) - cost * nfe``, where
``rmse_base`` is what the base schedule with ``base_expert`` reaches from the same noise; all other
rewards are 0 (RLlib adds a reward for an agent without an observation to its last action).

``experts`` (env_config, default all) restricts the experts in play: with several, the router picks
among them (router action ``j`` -> global expert ``experts[j]``; expert agent ids keep the global
index); with ONE there is no router at all (the ``ppo-single`` ablation: step size only, one solver)
and every env step is one sampler step in which that expert's agents act.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from rldiff.denoisers import UNCONDITIONAL, Condition, labels_for_seeds
from rldiff.metrics import rmse_per_sample
from rldiff.models import load_model, visible_device
from rldiff.policies import Decision, Observation, budget_log_step
from rldiff.reference import DEFAULT_STEPS, seed_bank
from rldiff.sampler import Sampling, sample
from rldiff.seeds import initial_noise
from rldiff.solvers import EXPERT_NAMES, EXPERTS, expert_index

K = len(EXPERTS)
REWARD_CLIP = 2.0  # |log(rmse_base / rmse)| cap: a few outliers cannot dominate
COST_SCALE = 50.0  # the cost feature is cost_per_nfe * 50 (1.0 at a cost of 0.02 per NFE)
OBS_DIM = 8 + (K + 1) + 11 + 2
ENV_DEFAULTS = {
    "model": "gmm",  # load_model spec: "gmm", "embedded" or a diffusers directory
    "batch_size": 32,  # samples per episode; one env step works on all of them
    "n_train": 256,  # training seeds 0 .. n_train - 1 (evaluation seeds never overlap)
    "guidance": [1.0],  # guidance scales, drawn per sample
    "budgets": [3, 4, 5, 6, 8, 10],  # NFE budgets, drawn per sample
    "cost_per_nfe": 0.0,  # a float, or a list drawn per sample
    "base_expert": "unipc",  # the solver of the base schedule that defines reward 0
    "experts": None,  # expert names in play (None: all); one name: no router (step size only)
    "base_schedules": None,  # {budget: sigmas ending in 0}; None: the budget-aware logSNR split
    "step_range": 1.5,  # a step action of +-1 scales the base log-step by 1.5^+-1
    "reference_steps": DEFAULT_STEPS,
    "cache": ".cache/rldiff",  # where the reference bank is kept
    "seed": 0,
    "device": None,  # None: cuda when this process sees a GPU, else cpu
}


@dataclass(frozen=True)
class WarmStart:
    """The base schedule the step action scales around: per-budget sigmas, or the logSNR split."""

    schedules: dict[int, torch.Tensor] | None = None  # budget -> decreasing sigmas ending in 0
    step_range: float = 1.5

    @classmethod
    def make(cls, schedules=None, step_range: float = 1.5) -> WarmStart:
        """Accepts JSON-ish input (string budget keys, lists of sigmas)."""
        if schedules is not None:
            schedules = {
                int(b): torch.as_tensor(s, dtype=torch.float64) for b, s in schedules.items()
            }
        return cls(schedules, float(step_range))

    def sigma_next(self, obs: Observation) -> torch.Tensor:
        """Each sample's base next sigma: 0 (a jump) once no NFE remains."""
        remaining = (obs.budget - obs.nfe).clamp_min(0).to(torch.float64)
        if self.schedules is None:  # the budget-aware logSNR split (AdaptivePolicy's floor)
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
        return list(range(K))
    if isinstance(names, str):
        names = [names]
    out = [expert_index(n) for n in names]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"experts must be distinct names, at least one: got {names!r}")
    return out


def decision_from_actions(obs: Observation, experts, actions, base: WarmStart) -> Decision:
    """The sampler decision for expert choices ``experts`` [b] and expert actions ``[b, 2]``.

    ``actions[:, 0]`` scales the base log-step: ``h = h_base * step_range ** a`` (``h_base`` is the
    distance to sigma_min when the base jumps to 0); the sample jumps to 0 when the step passes
    below both sigma_min and the base point, or no NFE remains, or it is at sigma_min already.
    ``actions[:, 1]`` gives the noise amount ``eta = (a + 1) / 2`` of a stochastic expert (0 for the others). Zero actions reproduce
    the base schedule exactly (``sigma_next = base * exp(-0)``).
    """
    experts = torch.as_tensor(np.asarray(experts), dtype=torch.long).reshape(-1)
    a = torch.as_tensor(np.asarray(actions), dtype=torch.float64).reshape(-1, 2).clamp(-1, 1)
    base_next = base.sigma_next(obs)
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


class WarmStartPolicy:
    """The base itself as a ``Policy``: one expert, zero actions (defines reward 0)."""

    def __init__(self, expert: str, base: WarmStart):
        self.expert, self.base, self.name = expert_index(expert), base, f"warm-start:{expert}"

    def act(self, obs: Observation) -> Decision:
        b = len(obs.index)
        return decision_from_actions(obs, [self.expert] * b, np.zeros((b, 2)), self.base)


def observation_vector(obs: Observation, base_next: torch.Tensor, cost_per_nfe) -> np.ndarray:
    """Features ``[b, OBS_DIM]`` float32, the same for the router and the experts, in this order:

    0 log sigma normalised to [0, 1] over [sigma_min, sigma_max] (the remaining log-range
    fraction); 1 steps taken / 10;
    2 NFE used (this step's evaluation included) / budget; 3 budget / 10;
    4 the base step's log-range fraction: log(sigma / base next) / log(sigma_max / sigma_min)
    (the remaining fraction when the base jumps to 0); 5 RMS change of the denoised estimate since
    the last step; 6 RMS of the denoised estimate; 7 last log-step / log(sigma_max / sigma_min);
    8..8+K last expert one-hot (slot K: none yet); next 11: class one-hot (slot 10: unconditional);
    then guidance scale; then cost per NFE * COST_SCALE.
    """
    total = math.log(obs.sigma_max / obs.sigma_min)
    span = (obs.sigma / obs.sigma_min).log().clamp(0, total)
    step = torch.where(base_next > 0, (obs.sigma / base_next.clamp_min(1e-300)).log(), span)
    b = len(obs.index)
    last = torch.where(obs.last_expert < 0, K, obs.last_expert)
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
            torch.nn.functional.one_hot(last.cpu(), K + 1),
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


def training_references(denoiser, config: dict) -> dict[float, torch.Tensor]:
    """Reference x0 [n_train, ...] of the training seeds per guidance scale, cached on disk."""
    seeds, steps = list(range(config["n_train"])), config["reference_steps"]
    return {
        g: seed_bank(config["cache"], denoiser, "train", seeds, g, steps, progress=False).x0
        for g in map(float, config["guidance"])
    }


class RoutingEnv(MultiAgentEnv):
    """Routers and experts over one batch of samples per episode (see the module docstring).

    ``summary`` holds the last finished episode's metrics for callbacks (infos given to agents
    without an observation are dropped by RLlib's episode, so they cannot carry them).
    ``agents`` stays ``possible_agents``: agents of finished samples are terminated, not removed.
    """

    def __init__(self, env_config: dict | None = None):
        super().__init__()
        torch.set_num_threads(1)
        cfg = {**ENV_DEFAULTS, **(env_config or {})}
        self.config, self.batch_size = cfg, int(cfg["batch_size"])
        self.denoiser = load_model(cfg["model"], cfg["device"] or visible_device())
        self.device = getattr(self.denoiser, "device", torch.device("cpu"))  # the GMM: cpu
        self.references = training_references(self.denoiser, cfg)
        self.base = WarmStart.make(cfg["base_schedules"], cfg["step_range"])
        self.base_policy = WarmStartPolicy(cfg["base_expert"], self.base)
        self.experts = experts_in_use(cfg["experts"])  # router action j -> expert experts[j]
        self.routed = len(self.experts) > 1  # one expert: no router agents
        self._base_rmse: dict[tuple, float] = {}  # (seed, guidance, budget) -> base RMSE
        runner = [getattr(env_config, a, 0) for a in ("worker_index", "vector_index")]
        self._rng = np.random.default_rng([int(cfg["seed"]), *runner])
        obs_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        expert_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        n, ks = self.batch_size, self.experts
        ids = [(f"router_{i}", gym.spaces.Discrete(len(ks))) for i in range(n) if self.routed]
        ids += [(f"expert{k}_{i}", expert_space) for i in range(n) for k in ks]
        self.possible_agents = [aid for aid, _ in ids]
        self.agents = list(self.possible_agents)
        self.observation_spaces = {aid: obs_space for aid, _ in ids}
        self.action_spaces = dict(ids)
        self.summary: dict[str, float] = {}

    def reset(self, *, seed=None, options=None):
        """Draws a batch (training seeds, guidance, budgets, costs); the routers (or, with one
        expert, its agents) observe."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        cfg, b, rng = self.config, self.batch_size, self._rng
        self.seeds = rng.choice(cfg["n_train"], b, replace=cfg["n_train"] < b).tolist()
        guidance = rng.choice(np.asarray(cfg["guidance"], dtype=np.float64), b).tolist()
        self.budget = torch.as_tensor(rng.choice(cfg["budgets"], b), dtype=torch.long)
        self.cost = torch.as_tensor(rng.choice(np.atleast_1d(cfg["cost_per_nfe"]), b)).double()
        self.cond = Condition.make(
            labels_for_seeds(self.seeds, self.denoiser.num_classes), guidance
        )
        pairs = zip(self.seeds, guidance, strict=True)
        self.reference = torch.stack([self.references[g][s] for s, g in pairs])
        self.noise = initial_noise(self.seeds, tuple(self.reference.shape[1:])).to(self.device)
        self.rmse_base = self._base(guidance)
        self.batch = Sampling(self.denoiser, self.noise, self.cond, self.budget, self.seeds)
        self.acted = [set() for _ in range(b)]  # expert indices that acted on each sample
        self.usage = np.zeros(K)
        return self._route(), {}

    def step(self, action_dict):
        """Step A takes the routers' choices; step B the experts' actions, then samples (one
        expert: step B only)."""
        rewards = {aid: 0.0 for aid in action_dict}
        running = {"__all__": False}
        if self.chosen is None:  # step A: the routers chose; the chosen experts observe next
            self.chosen = [self.experts[int(action_dict[f"router_{i}"])] for i in self.rows]
            return self._experts_observe(), rewards, running, running, {}
        turn = list(zip(self.rows, self.chosen, strict=True))  # step B: the experts acted
        actions = np.stack([action_dict[f"expert{k}_{i}"] for i, k in turn])
        applied = self.batch.advance(
            decision_from_actions(self.obs, self.chosen, actions, self.base)
        )
        self.usage += np.bincount(applied.expert.numpy(), minlength=K)
        for i, k in turn:
            self.acted[i].add(k)
        terminateds = {"__all__": self.batch.done}
        finished = self.obs.index[applied.sigma_next == 0].tolist()
        r = self._rewards() if finished else None
        for i in finished:  # the sample's router and every expert that acted on it share r
            router = [f"router_{i}"] if self.routed else []
            for aid in [*router, *(f"expert{e}_{i}" for e in sorted(self.acted[i]))]:
                rewards[aid], terminateds[aid] = float(r[i]), True
        if self.batch.done:
            self._summarise(r)
            return {}, rewards, terminateds, running, {}
        return self._route(), rewards, terminateds, running, {}

    def _route(self) -> dict:
        """Evaluates the denoiser for every unfinished sample; the routers observe (one expert:
        its agents observe at once)."""
        self.obs, self.chosen = self.batch.observe(), None
        self.rows = self.obs.index.tolist()
        cost = self.cost[self.obs.index]
        self.vec = observation_vector(self.obs, self.base.sigma_next(self.obs), cost)
        if not self.routed:
            self.chosen = [self.experts[0]] * len(self.rows)
            return self._experts_observe()
        return {f"router_{i}": o for i, o in zip(self.rows, self.vec, strict=True)}

    def _experts_observe(self) -> dict:
        turn = zip(self.rows, self.chosen, self.vec, strict=True)
        return {f"expert{k}_{i}": o for i, k, o in turn}

    def _base(self, guidance: list[float]) -> torch.Tensor:
        """Base RMSE per sample: cached per (seed, guidance, budget), the misses run as one batch."""
        keys = list(zip(self.seeds, guidance, self.budget.tolist(), strict=True))
        miss = [j for j, key in enumerate(keys) if key not in self._base_rmse]
        if miss:
            m, seeds = torch.tensor(miss), [self.seeds[j] for j in miss]
            run = sample(
                self.denoiser, self.base_policy, self.noise[m], self.cond[m], self.budget[m], seeds
            )
            rmse = rmse_per_sample(run.x0, self.reference[m]).tolist()
            self._base_rmse.update({keys[j]: e for j, e in zip(miss, rmse, strict=True)})
        return torch.tensor([self._base_rmse[key] for key in keys], dtype=torch.float64)

    def _rewards(self) -> torch.Tensor:
        self.rmse = rmse_per_sample(self.batch.x, self.reference)
        return reward(self.rmse, self.rmse_base, self.batch.nfe, self.cost)

    def _summarise(self, rewards: torch.Tensor) -> None:
        nfe, usage = self.batch.nfe.double(), self.usage / self.usage.sum()
        self.summary = {
            "rmse_mean": float(self.rmse.mean()),
            "rmse_base_mean": float(self.rmse_base.mean()),
            "nfe_mean": float(nfe.mean()),
            "nfe_over_budget": float((nfe / self.budget).mean()),
            "reward_mean": float(rewards.mean()),
            **{f"expert_usage/{n}": float(u) for n, u in zip(EXPERT_NAMES, usage, strict=True)},
        }
