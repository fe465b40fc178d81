"""The routing MDP as an RLlib multi-agent env: one episode samples a batch with the shared sampler.

One agent per *module*, each acting on every sample of the batch at once (a row per sample):
``router`` (action ``[B]`` in ``Discrete(len(experts))``: which expert solver steps each sample)
and ``expert{k}`` (action ``[B, 2]`` in [-1, 1]: step size and noise amount around the base
schedule). Turn-based: env step A, the router acts on every unfinished sample; env step B, every
expert in play acts, and a row counts for expert ``k`` only where the router chose ``k``; then
``Sampling.advance`` steps the whole batch with one ``Decision`` (and the next ``observe()``
evaluates the denoiser once for all unfinished samples). So RLlib's bookkeeping per sampler step is
a handful of agents, not two per sample, whatever the batch size.

Each agent observes ``[B, ROW_WIDTH]`` (``rldiff.rl.rows``): the sample's features, whether the
agent acts on the row now, and the reward the row brought this agent since its last observation.
At a sample's end its router row and the row of every expert that acted on it get
``r = clip(log(rmse_base / rmse), -2, 2) - cost * nfe``, where ``rmse_base`` is what the base
schedule with ``base_expert`` reaches from the same noise; all other rewards are 0. The learner
(``rldiff.rl.learner``) turns these rows back into one PPO row per (sample, step) with its own
advantage: per-sample credit assignment, as if each sample had agents of its own. The scalar
reward RLlib sees is the mean over the batch (for its episode-return metrics only).
What the actions mean, the features and the reward are ``rldiff.core.routing``'s.

``experts`` (env_config, default all) restricts the experts in play: with several, the router picks
among them (router action ``j`` -> global expert ``experts[j]``, ``routed_experts``; expert agent
ids keep the global index); with ONE there is no router at all (the ``ppo-single`` ablation: step
size only, one solver) and every env step is one sampler step in which that expert acts.

``conditions`` (env_config, from ``rldiff train --conditions-from``: logged traffic) replaces the
independent draws of guidance and budget: each sample draws a ``[guidance, budget, label,
weight]`` entry by weight, then a training seed of that class (labels are the seeds' own,
``seed % num_classes``); label -1 (an unconditional request) takes any training seed and samples
it unconditionally, against a reference bank of unconditional solves (``unconditional_bank``).
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
from rldiff.data.traffic import unconditional_bank
from rldiff.rl.rows import ROW_WIDTH, row_observation


def env_defaults() -> dict:
    """The env config of a default ``TrainConfig`` (``device`` None: cuda where this process sees a
    GPU, else cpu)."""
    return {**TrainConfig().env_config(), "device": None}


def training_references(denoiser, config: dict) -> dict[float, torch.Tensor]:
    """Reference x0 [n_train, ...] of the training seeds per guidance scale (those of
    ``conditions`` where given), cached on disk."""
    seeds, steps = list(range(config["n_train"])), config["reference_steps"]
    conditions = config.get("conditions")
    scales = sorted({float(c[0]) for c in conditions}) if conditions else config["guidance"]
    return {
        g: seed_bank(config["cache"], denoiser, "train", seeds, g, steps, progress=False).x0
        for g in map(float, scales)
    }


def unconditional_references(denoiser, config: dict) -> dict[float, torch.Tensor]:
    """Reference x0 [n_train, ...] of the training seeds sampled unconditionally, per guidance
    scale at which ``conditions`` asks for label -1 (none for a model without classes: its
    ``training_references`` are unconditional already)."""
    conditions = config.get("conditions") or []
    scales = sorted({float(g) for g, _, label, _ in conditions if label < 0})
    if denoiser.num_classes <= 0:
        return {}
    seeds, steps = list(range(config["n_train"])), config["reference_steps"]
    cache = config["cache"]
    return {g: unconditional_bank(cache, denoiser, "train", seeds, g, steps).x0 for g in scales}


ROUTER_AGENT = "router"


def expert_agent(k: int) -> str:
    """The agent id of global expert ``k``."""
    return f"expert{k}"


class RoutingEnv(MultiAgentEnv):
    """The router and the experts over one batch of samples per episode (see the module docstring).

    ``summary`` holds the last finished episode's metrics for callbacks (infos given to agents
    without an observation are dropped by RLlib's episode, so they cannot carry them).
    """

    def __init__(self, env_config: dict | None = None):
        super().__init__()
        torch.set_num_threads(1)
        cfg = {**env_defaults(), **(env_config or {})}
        self.config, self.batch_size = cfg, int(cfg["batch_size"])
        self.denoiser = load_model(cfg["model"], cfg["device"] or visible_device())
        self.device = getattr(self.denoiser, "device", torch.device("cpu"))  # the GMM: cpu
        self.references = training_references(self.denoiser, cfg)
        self.unconditional = unconditional_references(self.denoiser, cfg)
        self.base = BaseSchedule.make(cfg["base_schedules"], cfg["step_range"])
        self.base_policy = BaseSchedulePolicy(cfg["base_expert"], self.base)
        self.experts = experts_in_use(cfg["experts"])  # router action j -> expert experts[j]
        self.routed = len(self.experts) > 1  # one expert: no router agent
        self._base_rmse: dict[tuple, float] = {}  # (seed, label, guidance, budget) -> RMSE
        runner = [getattr(env_config, a, 0) for a in ("worker_index", "vector_index")]
        self._rng = np.random.default_rng([int(cfg["seed"]), *runner])
        n = self.batch_size
        obs_space = gym.spaces.Box(-np.inf, np.inf, (n, ROW_WIDTH), np.float32)
        self.expert_agents = [expert_agent(k) for k in self.experts]
        spaces = {a: gym.spaces.Box(-1.0, 1.0, (n, 2), np.float32) for a in self.expert_agents}
        if self.routed:
            spaces = {ROUTER_AGENT: gym.spaces.MultiDiscrete([len(self.experts)] * n), **spaces}
        self.possible_agents = list(spaces)
        self.agents = list(self.possible_agents)
        self.observation_spaces = {a: obs_space for a in spaces}
        self.action_spaces = spaces
        self.summary: dict[str, float] = {}

    def reset(self, *, seed=None, options=None):
        """Draws a batch (training seeds, guidance, budgets, costs); the router (or, with one
        expert, that expert) observes."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        cfg, b, rng = self.config, self.batch_size, self._rng
        if cfg.get("conditions"):
            self.seeds, guidance, budget, labels = self._draw_conditions()
        else:
            self.seeds = rng.choice(cfg["n_train"], b, replace=cfg["n_train"] < b).tolist()
            guidance = rng.choice(np.asarray(cfg["guidance"], dtype=np.float64), b).tolist()
            budget = rng.choice(cfg["budgets"], b)
            labels = labels_for_seeds(self.seeds, self.denoiser.num_classes)
        self.budget = torch.as_tensor(budget, dtype=torch.long)
        self.cost = torch.as_tensor(rng.choice(np.atleast_1d(cfg["cost_per_nfe"]), b)).double()
        self.cond = Condition.make(labels, guidance)
        banks = [self.unconditional if c < 0 else self.references for c in labels]
        triples = zip(banks, self.seeds, guidance, strict=True)
        self.reference = torch.stack([bank.get(g, self.references[g])[s] for bank, s, g in triples])
        self.noise = initial_noise(self.seeds, tuple(self.reference.shape[1:])).to(self.device)
        self.rmse_base = self._base(guidance)
        self.batch = Sampling(self.denoiser, self.noise, self.cond, self.budget, self.seeds)
        # acted[j, i]: expert experts[j] acted on sample i; pending: rewards not yet observed
        self.acted = np.zeros((len(self.experts), b), dtype=bool)
        self.pending = {a: np.zeros(b, np.float32) for a in self.possible_agents}
        self.usage = np.zeros(N_EXPERTS)
        return self._route(), {}

    def step(self, action_dict):
        """Step A takes the router's choices; step B the experts' actions, then samples (one
        expert: step B only)."""
        rewards = {aid: 0.0 for aid in action_dict}
        running = {"__all__": False}
        if self.chosen is None:  # step A: the router chose; the experts observe next
            choices = np.asarray(action_dict[ROUTER_AGENT]).reshape(-1)[self.rows]
            self.chosen = routed_experts(self.obs, choices, self.experts, self.base)
            return self._experts_observe(), rewards, running, running, {}
        actions = np.zeros((len(self.rows), 2), np.float32)  # step B: the experts acted
        for j, k in enumerate(self.experts):
            mine = (self.chosen == k).numpy()
            actions[mine] = np.asarray(action_dict[expert_agent(k)])[self.rows[mine]]
            self.acted[j, self.rows[mine]] = True
        applied = self.batch.advance(
            decision_from_actions(self.obs, self.chosen, actions, self.base)
        )
        self.usage += np.bincount(applied.expert.numpy(), minlength=N_EXPERTS)
        finished = self.rows[(applied.sigma_next == 0).numpy()]
        if len(finished):  # the sample's router row and every expert that acted on it get r
            r = self._rewards().numpy().astype(np.float32)
            if self.routed:
                self.pending[ROUTER_AGENT][finished] += r[finished]
            for j, agent in enumerate(self.expert_agents):
                mine = finished[self.acted[j, finished]]
                self.pending[agent][mine] += r[mine]
                rewards[agent] = float(r[mine].sum()) / self.batch_size
            if self.routed:
                rewards[ROUTER_AGENT] = float(r[finished].sum()) / self.batch_size
        if self.batch.done:  # every agent sees its last rewards in a final observation
            self._summarise(self._rewards())
            done = {a: True for a in self.possible_agents}
            nothing = np.zeros((0, OBS_DIM), np.float32)
            final = self._observe(self.possible_agents, np.zeros(0, np.int64), nothing)
            return final, rewards, {**done, "__all__": True}, running, {}
        return self._route(), rewards, running, running, {}

    def _route(self) -> dict:
        """Evaluates the denoiser for every unfinished sample; the router observes (one expert:
        that expert observes at once)."""
        self.obs, self.chosen = self.batch.observe(), None
        self.rows = self.obs.index.numpy()
        cost = self.cost[self.obs.index]
        self.vec = observation_vector(self.obs, self.base.sigma_next(self.obs), cost)
        if not self.routed:
            self.chosen = torch.full((len(self.rows),), self.experts[0], dtype=torch.long)
            return self._experts_observe()
        return self._observe([ROUTER_AGENT], self.rows, self.vec, {ROUTER_AGENT: self.rows})

    def _experts_observe(self) -> dict:
        acting = {
            agent: self.rows[(self.chosen == k).numpy()]
            for k, agent in zip(self.experts, self.expert_agents, strict=True)
        }
        return self._observe(self.expert_agents, self.rows, self.vec, acting)

    def _observe(self, agents, rows, features: np.ndarray, acting: dict | None = None) -> dict:
        """Each agent's ``[B, ROW_WIDTH]`` observation: ``features`` on ``rows``, whether it acts
        on each row (``acting[agent]``: row indices), and its pending rewards (then cleared)."""
        out = {}
        for agent in agents:
            mine = acting.get(agent, rows[:0]) if acting else rows[:0]
            out[agent] = row_observation(self.batch_size, rows, features, mine, self.pending[agent])
            self.pending[agent] = np.zeros(self.batch_size, np.float32)
        return out

    def _draw_conditions(self) -> tuple[list[int], list[float], list[int], list[int]]:
        """Seeds, guidance, budgets and labels of a batch drawn from ``conditions`` (see the
        module docstring)."""
        cfg, rng, classes = self.config, self._rng, self.denoiser.num_classes
        table = np.asarray(cfg["conditions"], dtype=np.float64)
        drawn = table[rng.choice(len(table), self.batch_size, p=table[:, 3] / table[:, 3].sum())]
        seeds = []
        for label in drawn[:, 2].astype(int):
            pool = np.arange(cfg["n_train"])
            if label >= 0 and classes > 0:
                pool = pool[pool % classes == label]
            if not len(pool):
                raise ValueError(f"no training seed of class {label} in 0..{cfg['n_train'] - 1}")
            seeds.append(int(rng.choice(pool)))
        own = labels_for_seeds(seeds, classes)  # label -1 keeps -1: unconditional
        labels = [c if c < 0 else o for c, o in zip(drawn[:, 2].astype(int), own, strict=True)]
        return seeds, drawn[:, 0].tolist(), drawn[:, 1].astype(int).tolist(), labels

    def _base(self, guidance: list[float]) -> torch.Tensor:
        """Base RMSE per sample: cached per (seed, label, guidance, budget), the misses run as one
        batch."""
        labels = self.cond.labels.tolist()
        keys = list(zip(self.seeds, labels, guidance, self.budget.tolist(), strict=True))
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
