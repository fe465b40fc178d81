"""RLlib's configuration for the router + experts, built in one place: ``build_config``.

Collapse guard, two parts:

- an entropy bonus of its own for the router (``router_entropy_coeff``, through RLlib's per-module
  config overrides), so PPO keeps exploring the experts instead of locking onto one early, and
  every expert keeps getting rows to learn from; it is annealed (``router_entropy_final``) so the
  router can commit to its best choices late in training, when the experts have learned;
- a warm start toward the base expert (``router_warm_start``, set by the modules themselves:
  ``WarmStartPPOModule``). The env's base schedule is the base expert's (``base_expert``) optimised
  global schedule, and a zero step action reproduces it, so "base expert, zero action" is a policy
  worth 0 reward by construction. A router that starts uniform over the experts is far from it:
  most early episodes run solvers the schedule was not tuned for, their rewards are poor and noisy,
  and PPO has been seen to collapse onto a poor expert. So a fresh run's router starts with
  probability ``router_warm_start`` (default 0.8) on the base expert and the rest spread uniformly
  over the others (enough for every expert to be tried, and for the entropy bonus to work from).
  Only the bias of the router's policy-head output layer is set (to the log of these
  probabilities); its weights keep their random init, so the logits still depend on the
  observation a little and the probabilities are the target on average, not exactly. Every copy
  of the module (learner, env runners) starts so when it is built; a restored or resumed run then
  loads its checkpoint's weights over it. 0 or None turns it off (a uniform start, up to the
  random init).

Expert usage and router entropy are logged every episode to watch for collapse anyway.

Fine-tuning (``init_policy``: an exported policy directory) replaces the warm start: every copy of
each module loads that policy's actor weights when it is built (``INITIAL_WEIGHTS``); the value
function starts fresh (an export has none).

``TrainConfig.experts`` picks the experts in play: modules ``expert_<global index>`` for those
only, and ``router`` only when there is more than one (one expert is the single-agent ``ppo-single``
ablation: step size only, one solver). Router action ``j`` is ``experts[j]``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rldiff.config import TrainConfig
from rldiff.core.policy_net import file_sha256
from rldiff.core.routing import N_EXPERTS, OBS_DIM, experts_in_use
from rldiff.core.solvers import EXPERT_NAMES, expert_index
from rldiff.rl.env import ROUTER_AGENT, RoutingEnv
from rldiff.rl.learner import MINIBATCH_ROWS, RowPPOLearner
from rldiff.rl.rows import ACTS

ROUTER = "router"
EXPERT_MODULES = tuple(f"expert_{k}" for k in range(N_EXPERTS))
METRICS = "rldiff"  # custom metrics land in result["env_runners"]["rldiff"][...]
METRICS_WINDOW = 100  # episodes each custom metric is averaged over


def module_ids(experts=None) -> tuple[str, ...]:
    """The modules for the experts in play (names, None: all): ``router`` only if more than one."""
    ks = experts_in_use(experts)
    return (*([ROUTER] if len(ks) > 1 else []), *(EXPERT_MODULES[k] for k in ks))


def policy_mapping_fn(agent_id: str, episode=None, **kwargs) -> str:
    """``router`` -> ``router``; ``expert{k}`` -> ``expert_{k}``."""
    if agent_id == ROUTER_AGENT:
        return ROUTER
    return f"expert_{int(agent_id.removeprefix('expert'))}"


def module_spaces(module_id: str, n_experts: int) -> tuple[gym.Space, gym.Space]:
    """A module's observation and action space for ONE sample (a row of its agent's batch):
    the module is the same network a per-sample agent would have."""
    obs = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    if module_id == ROUTER:
        return obs, gym.spaces.Discrete(n_experts)
    return obs, gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def fresh_modules(cfg: TrainConfig):
    """The inference modules of ``build_config(cfg)``, freshly initialised, built without an env
    (a ``MultiRLModule``: one module per router / expert in play)."""
    experts = cfg.env_config()["experts"]
    n_experts = len(experts_in_use(experts))
    spaces = {m: module_spaces(m, n_experts) for m in module_ids(experts)}
    spec = build_config(cfg).get_multi_rl_module_spec(spaces=spaces, inference_only=True)
    return spec.build()


def build_config(cfg: TrainConfig) -> PPOConfig:
    """THE RLlib config: multi-agent PPO over ``RoutingEnv``, one module per router / expert in
    play (``cfg.experts``)."""
    model = asdict(DefaultModelConfig(fcnet_hiddens=list(cfg.hidden), vf_share_layers=False))
    env_config = cfg.env_config()
    modules = module_ids(env_config["experts"])
    n_experts = len(experts_in_use(env_config["experts"]))
    overrides = {ROUTER: {"entropy_coeff": router_entropy(cfg)}} if ROUTER in modules else {}
    return (
        PPOConfig()
        .environment(RoutingEnv, env_config=env_config)
        .multi_agent(
            policies=set(modules),
            policy_mapping_fn=policy_mapping_fn,
            # Not "agent_steps": in 2.60 an agent id sampled in one iteration and absent from the
            # next has a NaN step count there, and synchronous_parallel_sample's int() fails.
            count_steps_by="env_steps",
        )
        .rl_module(
            rl_module_spec=MultiRLModuleSpec(
                rl_module_specs={
                    m: RLModuleSpec(
                        module_class=WarmStartPPOModule,
                        observation_space=module_spaces(m, n_experts)[0],
                        action_space=module_spaces(m, n_experts)[1],
                        model_config={**model, **initial_outputs(cfg, m)},
                    )
                    for m in modules
                }
            ),
            algorithm_config_overrides_per_module=overrides,
        )
        .env_runners(
            num_env_runners=cfg.env_runners,
            num_envs_per_env_runner=1,
            num_cpus_per_env_runner=1,
            num_gpus_per_env_runner=gpus_per_env_runner(cfg.env_runners),
            # Whole episodes: every sample's trajectory ends inside the batch, so the per-row
            # advantages (``RowPPOLearner``) need no bootstrap values.
            batch_mode="complete_episodes",
        )
        .learners(
            learner_class=RowPPOLearner,
            learner_config_dict={MINIBATCH_ROWS: cfg.minibatch_rows()},
            **learner_resources(cfg.env_runners),
        )
        # A lost env runner (its node gone) is restarted elsewhere; the iteration goes on with
        # the others meanwhile, so training survives losing a worker node.
        .fault_tolerance(restart_failed_env_runners=True, delay_between_env_runner_restarts_s=1.0)
        .training(
            lr=cfg.lr,
            entropy_coeff=cfg.entropy_coeff,
            clip_param=cfg.clip,
            gamma=cfg.gamma,
            lambda_=cfg.lambda_,
            train_batch_size_per_learner=cfg.train_batch_size,
            # RLlib checks its minibatch against the train batch in env steps, and one env step
            # here is a whole batch of rows: the learner splits by MINIBATCH_ROWS instead.
            minibatch_size=min(cfg.minibatch_rows(), cfg.train_batch_size),
            num_epochs=cfg.num_epochs,
        )
        .callbacks(RoutingMetrics)
        .debugging(seed=cfg.seed)
    )


def router_entropy(cfg: TrainConfig) -> float | list[list[float]]:
    """The router's entropy bonus: constant, or RLlib's piecewise-linear schedule over sampled env
    steps (``train_batch_size`` per iteration) from ``router_entropy_coeff`` to
    ``router_entropy_final`` at ``router_entropy_anneal`` of ``iterations``, then flat."""
    final = cfg.router_entropy_final
    if final is None or final == cfg.router_entropy_coeff:
        return cfg.router_entropy_coeff
    end = max(1, round(cfg.iterations * cfg.router_entropy_anneal)) * cfg.train_batch_size
    return [[0, cfg.router_entropy_coeff], [end, final]]


def router_warm_start_probs(cfg: TrainConfig) -> np.ndarray | None:
    """The router's initial action probabilities for ``cfg``: ``router_warm_start`` on the
    conditional table's expert (action 0, ``routed_experts``) where ``cfg`` has own schedules, else
    on the base expert (action ``j`` is ``experts[j]``), the rest uniform over the others.
    None when there is nothing to warm-start: turned off, no router (one expert), or the base
    expert not in play."""
    p = cfg.router_warm_start
    if not p:
        return None
    if not 0 < p < 1:
        raise ValueError(f"router_warm_start must lie in (0, 1) (0 or None: off), got {p!r}")
    experts = experts_in_use(cfg.env_config()["experts"])
    if len(experts) < 2:
        return None
    probs = np.full(len(experts), (1 - p) / (len(experts) - 1))
    if isinstance(cfg.base_schedules, list):  # action 0 is the table's expert (routed_experts)
        probs[0] = p
        return probs
    base = expert_index(cfg.base_expert)
    if base not in experts:
        return None
    probs[experts.index(base)] = p
    return probs


# WarmStartPPOModule's own model_config keys (filled in by initial_outputs).
INITIAL_PROBS = "initial_probs"  # the router's initial action probabilities
INITIAL_STD = "initial_std"  # an expert's initial Gaussian std
INITIAL_WEIGHTS = "initial_weights"  # {"path", "sha256"}: an exported network's actor weights


def initial_outputs(cfg: TrainConfig, module_id: str) -> dict:
    """``module_id``'s ``WarmStartPPOModule`` keys for its ``model_config``: the router's
    ``router_warm_start_probs``, an expert's ``expert_init_std``; none when turned off. With
    ``init_policy``: that policy's weights of ``module_id`` instead."""
    if cfg.init_policy:
        return {INITIAL_WEIGHTS: exported_weights(cfg.init_policy, module_id)}
    if module_id == ROUTER:
        probs = router_warm_start_probs(cfg)
        return {} if probs is None else {INITIAL_PROBS: probs.tolist()}
    std = cfg.expert_init_std
    if not std:
        return {}
    if std <= 0:
        raise ValueError(f"expert_init_std must be positive (0 or None: off), got {std!r}")
    return {INITIAL_STD: float(std)}


def exported_weights(policy_dir, module_id: str) -> dict:
    """Where an exported policy keeps ``module_id``'s weights: ``{"path", "sha256"}``."""
    policy_dir = Path(policy_dir).resolve()  # env runners may start in another directory
    modules = json.loads((policy_dir / "policy.json").read_text()).get("modules", {})
    if module_id not in modules:
        raise ValueError(f"policy {policy_dir} has no module {module_id} (it has {list(modules)})")
    entry = modules[module_id]
    return {"path": str(policy_dir / entry["weights"]), "sha256": entry["sha256"]}


def warm_start_note(cfg: TrainConfig) -> str | None:
    """The line a fresh training run prints about its router's start (None: nothing to say)."""
    if cfg.init_policy:
        return f"modules start from the policy {cfg.init_policy} (value functions fresh)"
    experts = experts_in_use(cfg.env_config()["experts"])
    probs = router_warm_start_probs(cfg)
    if probs is not None and isinstance(cfg.base_schedules, list):
        return f"router warm start: the table's expert {probs[0]:.2f}, each other {probs[1]:.2f}"
    if probs is not None:
        targets = zip((EXPERT_NAMES[k] for k in experts), probs, strict=True)
        return "router warm start: " + " ".join(f"{n} {p:.2f}" for n, p in targets)
    if cfg.router_warm_start and len(experts) > 1:
        return f"router warm start skipped: base expert {cfg.base_expert} is not in play"
    return None


class WarmStartPPOModule(DefaultPPOTorchRLModule):
    """RLlib's default PPO torch module, its policy starting where its ``model_config`` says.

    After the default setup (same layers, same random draws), the output layer of ``pi`` (the
    action distribution inputs) is set from two optional keys:

    - ``initial_probs`` (the router): bias = log of these action probabilities; the weights keep
      their random init, so the probabilities hold on average over observations;
    - ``initial_std`` (an expert): the log-std half of the Gaussian's outputs gets zero weights and
      bias ``log(initial_std)``, that std for every observation; the mean half keeps its random
      init (near 0: the base schedule).

    Set at construction, not edited into a built algorithm: every copy (learner, env runners)
    starts so without a weight sync of its own, and a restore loads its checkpoint over it.

    Observations may carry more columns than the module's space (an agent's ``[B, ROW_WIDTH]``
    rows, ``rldiff.rl.rows``): every forward reads the first ``OBS_DIM`` columns, on any leading
    shape, so the env runner's forward on ``[1, B, ROW_WIDTH]`` gives per-sample outputs.
    """

    def _forward(self, batch, **kwargs):
        return super()._forward(features_only(batch), **kwargs)

    def _forward_train(self, batch, **kwargs):
        return super()._forward_train(features_only(batch), **kwargs)

    def compute_values(self, batch, embeddings=None):
        return super().compute_values(features_only(batch), embeddings)

    def setup(self):
        super().setup()
        config = self.model_config if isinstance(self.model_config, dict) else {}
        probs, std = config.get(INITIAL_PROBS), config.get(INITIAL_STD)
        if (weights := config.get(INITIAL_WEIGHTS)) is not None:
            load_actor_weights(self, weights["path"], weights["sha256"])
        if probs is None and std is None:
            return
        layer = policy_output_layer(self)
        size = layer.out_features if probs is None else len(probs)
        if layer.bias is None or layer.out_features != size:
            raise ValueError(f"policy head {layer} has no bias of size {size}")
        with torch.no_grad():
            if probs is not None:
                layer.bias.copy_(torch.as_tensor(np.log(probs), dtype=torch.float32))
            if std is not None:
                half = layer.out_features // 2
                layer.weight[half:].zero_()
                layer.bias[half:].fill_(float(np.log(std)))


def load_actor_weights(module, path, sha256: str | None = None) -> None:
    """Sets the actor path (encoder, then ``pi``) of a default PPO torch module to the weights of
    an exported ``PolicyNet`` (``path``: its safetensors, checked against ``sha256``; the
    inverse of ``rldiff.rl.export.policy_net_from_module``); the value function is left as it
    is. The layer shapes must match."""
    from safetensors.torch import load_file

    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{path} is not the weights file its policy.json describes (sha256)")
    state = load_file(str(path))
    sources = [
        (state[f"{part}.{i}.weight"], state[f"{part}.{i}.bias"])
        for part in ("encoder", "pi")
        for i in sorted({int(k.split(".")[1]) for k in state if k.startswith(part + ".")})
    ]
    targets = actor_layers(module)
    if len(sources) != len(targets):
        raise ValueError(f"{path} has {len(sources)} layers, the module {len(targets)}")
    with torch.no_grad():
        for layer, (weight, bias) in zip(targets, sources, strict=True):
            if layer.weight.shape != weight.shape:
                raise ValueError(
                    f"{path}: a layer of shape {tuple(weight.shape)} where the module has "
                    f"{tuple(layer.weight.shape)} (other hidden sizes or experts)"
                )
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def actor_layers(module) -> list[torch.nn.Linear]:
    """The linear layers of a default PPO module's actor path, in order: its encoder's (the
    actor's own, or the one it shares), then ``pi``'s."""
    encoder = getattr(module.encoder, "actor_encoder", None)
    encoder = module.encoder.encoder if encoder is None else encoder
    return [
        m for part in (encoder, module.pi) for m in part.modules() if isinstance(m, torch.nn.Linear)
    ]


def features_only(batch: dict) -> dict:
    """``batch`` with its observations cut to the ``OBS_DIM`` feature columns."""
    obs = batch[Columns.OBS]
    return batch if obs.shape[-1] == OBS_DIM else {**batch, Columns.OBS: obs[..., :OBS_DIM]}


def policy_output_layer(module) -> torch.nn.Linear:
    """The last linear layer of a default PPO module's policy head (``pi``): its outputs are the
    action distribution inputs (the router's logits)."""
    layers = [m for m in module.pi.modules() if isinstance(m, torch.nn.Linear)]
    if not layers:
        raise ValueError(f"{type(module).__name__}.pi has no linear layer")
    return layers[-1]


def gpus_per_env_runner(env_runners: int) -> float:
    """1 per remote env runner if the cluster has enough GPUs, a fair share if fewer, else 0.

    Never hard-coded: asking for a GPU that no node has makes the env runner wait forever.
    """
    if env_runners == 0:
        return 0  # the driver's own env runner sees whatever GPU the driver sees
    import ray

    gpus = (
        float(ray.cluster_resources().get("GPU", 0))
        if ray.is_initialized()
        else float(torch.cuda.device_count())
    )
    return 0 if gpus == 0 else min(1.0, gpus / env_runners)


def learner_resources(env_runners: int) -> dict:
    """A remote learner on a GPU of its own when the cluster has one more GPU than the env
    runners take; else the learner runs in the driver on CPU (the modules are small MLPs: the
    GPUs matter most for the denoiser in the env runners)."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    if gpus >= gpus_per_env_runner(env_runners) * env_runners + 1:
        return {"num_learners": 1, "num_gpus_per_learner": 1}
    return {"num_learners": 0, "num_gpus_per_learner": 0}


class RoutingMetrics(RLlibCallback):
    """Per-episode custom metrics in ``result["env_runners"][METRICS]``, logged by ``rldiff.rl.loop``
    as ``charts/*``: reference RMSE (policy and base), NFE, NFE / budget, reward, per-expert usage
    fractions and the router's mean policy entropy."""

    def on_episode_end(self, *, episode, env=None, env_index=0, metrics_logger=None, **kwargs):
        if metrics_logger is None:
            return
        routing = _routing_env(env, env_index)
        values = dict(routing.summary)
        entropy = _router_entropy(episode, len(routing.experts)) if routing.routed else None
        if entropy is not None:
            values["router_entropy"] = entropy
        for key, value in values.items():
            metrics_logger.log_value((METRICS, *key.split("/")), value, window=METRICS_WINDOW)


def _routing_env(env, index: int) -> RoutingEnv:
    """The ``RoutingEnv`` behind RLlib's vector env (it auto-resets on the next step, so its
    ``summary`` still describes the episode that just ended)."""
    envs = getattr(env, "envs", None)
    return (envs[index] if envs is not None else env).unwrapped


def _router_entropy(episode, n: int = N_EXPERTS) -> float | None:
    """Mean entropy (nats) of the router's action distribution (``n`` choices) over the samples
    it acted on in this episode chunk."""
    router = episode.agent_episodes.get(ROUTER_AGENT)
    if router is None or Columns.ACTION_DIST_INPUTS not in router.extra_model_outputs:
        return None
    logits = np.asarray(router.get_extra_model_outputs(Columns.ACTION_DIST_INPUTS), np.float64)
    steps = len(logits)
    acts = np.asarray(router.get_observations(slice(0, steps)))[..., ACTS] > 0.5
    logits = logits.reshape(steps, -1, n)[acts]
    if not len(logits):
        return None
    logp = torch.log_softmax(torch.as_tensor(logits), dim=1)
    return float(-(logp.exp() * logp).sum(1).mean())
