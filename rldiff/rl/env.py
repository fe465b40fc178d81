"""The routing MDP as an RLlib multi-agent env: one episode samples a batch with the shared sampler.

Agents per sample ``i``: ``router_{i}`` (Discrete(N_EXPERTS): which expert solver steps) and
``expert{k}_{i}`` (Box [-1, 1]^2: step size and noise amount around the base schedule).
Turn-based: env step A, every unfinished sample's router acts; env step B, each sample's chosen
expert acts, then ``Sampling.advance`` steps the whole batch with one ``Decision`` (and the next
``observe()`` evaluates the denoiser once for all unfinished samples). At a sample's end its router
and every expert that acted on it get ``r = clip(log(rmse_base / rmse), -2, 2) - cost * nfe``, where
``rmse_base`` is what the base schedule with ``base_expert`` reaches from the same noise; all other
rewards are 0 (RLlib adds a reward for an agent without an observation to its last action).
What the actions mean, the features and the reward are ``rldiff.core.routing``'s.

``experts`` (env_config, default all) restricts the experts in play: with several, the router picks
among them (router action ``j`` -> global expert ``experts[j]``; expert agent ids keep the global
index); with ONE there is no router at all (the ``ppo-single`` ablation: step size only, one solver)
and every env step is one sampler step in which that expert's agents act.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from rldiff.config import TrainConfig
from rldiff.core.denoisers import Condition, labels_for_seeds
from rldiff.core.error import rmse_per_sample
from rldiff.core.routing import (
    N_EXPERTS,
    OBS_DIM,
    BaseSchedule,
    BaseSchedulePolicy,
    decision_from_actions,
    experts_in_use,
    observation_vector,
    reward,
    routed_experts,
)
from rldiff.core.sampler import Sampling, sample
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERT_NAMES
from rldiff.data.models import load_model, visible_device
from rldiff.data.reference import seed_bank


def env_defaults() -> dict:
    """The env config of a default ``TrainConfig`` (``device`` None: cuda where this process sees a
    GPU, else cpu)."""
    return {**TrainConfig().env_config(), "device": None}


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
        cfg = {**env_defaults(), **(env_config or {})}
        self.config, self.batch_size = cfg, int(cfg["batch_size"])
        self.denoiser = load_model(cfg["model"], cfg["device"] or visible_device())
        self.device = getattr(self.denoiser, "device", torch.device("cpu"))  # the GMM: cpu
        self.references = training_references(self.denoiser, cfg)
        self.base = BaseSchedule.make(cfg["base_schedules"], cfg["step_range"])
        self.base_policy = BaseSchedulePolicy(cfg["base_expert"], self.base)
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
        self.usage = np.zeros(N_EXPERTS)
        return self._route(), {}

    def step(self, action_dict):
        """Step A takes the routers' choices; step B the experts' actions, then samples (one
        expert: step B only)."""
        rewards = {aid: 0.0 for aid in action_dict}
        running = {"__all__": False}
        if self.chosen is None:  # step A: the routers chose; the chosen experts observe next
            choices = [int(action_dict[f"router_{i}"]) for i in self.rows]
            self.chosen = routed_experts(self.obs, choices, self.experts, self.base).tolist()
            return self._experts_observe(), rewards, running, running, {}
        turn = list(zip(self.rows, self.chosen, strict=True))  # step B: the experts acted
        actions = np.stack([action_dict[f"expert{k}_{i}"] for i, k in turn])
        applied = self.batch.advance(
            decision_from_actions(self.obs, self.chosen, actions, self.base)
        )
        self.usage += np.bincount(applied.expert.numpy(), minlength=N_EXPERTS)
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
