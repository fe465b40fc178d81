"""The warm starts: a fresh Algorithm's router picks the base expert with probability
``router_warm_start`` (on average over observations), and the experts' Gaussians start with std
``expert_init_std``, in the learner AND on the env runners. The modules set this up themselves
(``WarmStartPPOModule``): RLlib's default modules, same random init, plus that recipe."""

import dataclasses

import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rldiff.core.routing import OBS_DIM, experts_in_use
from rldiff.core.solvers import EXPERT_NAMES
from rldiff.data.models import load_model
from rldiff.rl.algo import (
    ROUTER,
    TrainConfig,
    WarmStartPPOModule,
    build_config,
    module_ids,
    module_spaces,
    policy_output_layer,
    router_warm_start_probs,
    warm_start_note,
)
from rldiff.rl.env import RoutingEnv, training_references
from rldiff.rl.rows import ACTS

EXPERTS = ("heun", "unipc", "euler")  # a subset, base expert (unipc) at router action 1
BASE = EXPERTS.index("unipc")
OWN_SCHEDULES = [  # own schedules of two experts at one budget: the table is unipc at guidance 1
    {"solver": s, "budget": 4, "guidance": 1.0, "sigmas": [80.0, 5.0, 1.0, 0.1, 0.0],
     "train_rmse": r}
    for s, r in (("unipc", 0.1), ("euler", 0.2))
]  # fmt: skip
TOLERANCE = 0.05  # the output layer's weights keep their random init: logits vary a little


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return TrainConfig(
        model="gmm",
        batch_size=32,
        budgets=(4, 6),
        n_train=24,
        reference_steps=60,
        cache=str(tmp_path_factory.mktemp("warm-cache")),
        experts=EXPERTS,
        router_warm_start=0.8,
        hidden=(32, 32),
        train_batch_size=64,
        minibatch_size=64,
        num_epochs=1,
        env_runners=1,  # a remote env runner: the warm start must reach it
    )


@pytest.fixture(scope="module")
def tiny(cfg, tiny_train_config):
    """The tests' tiny training config (all experts, sampling in the driver)."""
    config = tiny_train_config(cfg.cache)
    training_references(load_model(config.model), config.env_config())
    return config


@pytest.fixture(scope="module")
def router_obs(cfg) -> torch.Tensor:
    """Router observations of one episode at every step (random routing, zero expert actions)."""
    training_references(load_model(cfg.model), cfg.env_config())  # cached for the env runner too
    env = RoutingEnv(cfg.env_config())
    obs, _ = env.reset(seed=3)
    rng, seen = np.random.default_rng(0), []
    b, done = env.batch_size, False
    while not done:
        if "router" in obs:
            router = obs["router"]
            seen += list(router[router[:, ACTS] > 0.5, :OBS_DIM])
        actions = {
            a: rng.integers(len(EXPERTS), size=b) if a == "router" else np.zeros((b, 2), "f4")
            for a in obs
        }
        obs, _, terminated, _, _ = env.step(actions)
        done = terminated["__all__"]
    return torch.as_tensor(np.stack(seen))


def initial_states(config) -> dict[str, dict]:
    """Module id -> state dict of a freshly built algorithm: the learner's modules, then the
    driver's env runner's (under ``runner/<id>``, the actor path only: all it is synced)."""
    ids = list(config.rl_module_spec.rl_module_specs)
    algo = config.build_algo()
    try:
        (learner,) = [
            r.get()
            for r in algo.learner_group.foreach_learner(
                lambda learner: {m: _state(learner.module[m]) for m in ids}
            )
        ]
        runner = {f"runner/{m}": _state(algo.get_module(m), _actor) for m in ids}
        return learner | runner
    finally:
        algo.stop()


def _state(module, keep=lambda key: True) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if keep(k)}


def _actor(key: str) -> bool:
    return key.startswith(("encoder.actor_encoder.", "pi."))


def default_modules(cfg: TrainConfig):
    """``build_config(cfg)`` with RLlib's default PPO modules and no warm start keys."""
    model = DefaultModelConfig(fcnet_hiddens=list(cfg.hidden), vf_share_layers=False)
    ids, n = module_ids(cfg.experts), len(experts_in_use(cfg.experts))
    specs = {
        m: RLModuleSpec(
            model_config=model,
            observation_space=module_spaces(m, n)[0],
            action_space=module_spaces(m, n)[1],
        )
        for m in ids
    }
    return build_config(cfg).rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=specs))


def warm_started(states: dict, cfg: TrainConfig) -> dict:
    """The warm start's recipe applied to default modules' states: the router's output bias
    = log of its target probabilities; an expert's log-std rows: zero weights, bias log(std)."""
    out = {m: dict(s) for m, s in states.items()}
    head = "pi.net.mlp.0."  # the output layer of pi (default config: no hidden head layers)
    for m, state in out.items():
        if m.endswith(ROUTER):
            logits = torch.as_tensor(np.log(router_warm_start_probs(cfg)), dtype=torch.float32)
            state[head + "bias"] = logits
        else:
            weight, bias = state[head + "weight"].clone(), state[head + "bias"].clone()
            half = len(bias) // 2
            weight[half:] = 0
            bias[half:] = float(np.log(cfg.expert_init_std))
            state[head + "weight"], state[head + "bias"] = weight, bias
    return out


def test_modules_start_as_the_default_ones_plus_the_warm_start(ray_local, tiny):
    """Bit for bit, every tensor of every module, learner and env runner: the random init is
    RLlib's own, and the warm start sets exactly ``warm_started``'s recipe, nothing else."""
    warm = initial_states(build_config(tiny))
    default = initial_states(default_modules(tiny))
    expected = warm_started(default, tiny)
    assert warm.keys() == expected.keys() and len(warm) == 2 * (1 + len(EXPERT_NAMES))  # twice
    for m, state in expected.items():
        assert warm[m].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(warm[m][key], value), f"{m} {key}"
    off = dataclasses.replace(tiny, router_warm_start=None, expert_init_std=0)
    plain = initial_states(build_config(off))
    assert all(torch.equal(plain[m][k], v) for m, s in default.items() for k, v in s.items())


def test_the_modules_are_rllibs_default_ones_with_the_warm_start_keys(tiny):
    config = build_config(tiny)
    spec = config.rl_module_spec.rl_module_specs
    assert {spec[m].module_class for m in spec} == {WarmStartPPOModule}
    assert issubclass(WarmStartPPOModule, DefaultPPOTorchRLModule)
    other = 0.2 / (len(EXPERT_NAMES) - 1)
    assert spec[ROUTER].model_config["initial_probs"] == pytest.approx(
        [other] * 2 + [0.8] + [other] * (len(EXPERT_NAMES) - 3)
    )
    assert spec["expert_2"].model_config["initial_std"] == 0.3
    assert "initial_std" not in spec[ROUTER].model_config
    off = build_config(dataclasses.replace(tiny, router_warm_start=0, expert_init_std=None))
    assert all(
        not {"initial_probs", "initial_std"} & set(s.model_config)
        for s in off.rl_module_spec.rl_module_specs.values()
    )
    with pytest.raises(ValueError, match="expert_init_std"):
        build_config(dataclasses.replace(tiny, expert_init_std=-0.1))
    assert warm_start_note(tiny) == (
        "router warm start: euler 0.04 dpmpp-2m 0.04 unipc 0.80 heun 0.04 euler-ancestral 0.04 "
        "ipndm 0.04"
    )
    table = dataclasses.replace(tiny, base_schedules=OWN_SCHEDULES)  # action 0: the table's expert
    assert router_warm_start_probs(table)[0] == pytest.approx(0.8)
    assert warm_start_note(table) == "router warm start: the table's expert 0.80, each other 0.04"
    absent = dataclasses.replace(tiny, experts=("euler", "heun"))
    assert warm_start_note(absent) == "router warm start skipped: base expert unipc is not in play"
    assert warm_start_note(dataclasses.replace(tiny, experts=("unipc",))) is None


def router_probs(module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: x})[Columns.ACTION_DIST_INPUTS]
    return torch.softmax(logits.double(), dim=1)


def learner_router(algo):
    (result,) = list(algo.learner_group.foreach_learner(lambda learner: learner.module[ROUTER]))
    return result.get()


def runner_routers(algo) -> list:
    """The router modules the env runners sample with: the local one and the remote ones."""
    remote = algo.env_runner_group.foreach_env_runner(
        lambda runner: runner.module[ROUTER], local_env_runner=False
    )
    return [algo.get_module(ROUTER), *remote]


def test_target_probabilities_follow_the_experts_in_play():
    full = router_warm_start_probs(TrainConfig(router_warm_start=0.6))
    np.testing.assert_allclose(full, [0.08, 0.08, 0.6, 0.08, 0.08, 0.08])  # unipc: expert 2 of 6
    sub = router_warm_start_probs(TrainConfig(experts=EXPERTS, base_expert="unipc"))
    np.testing.assert_allclose(sub, [0.1, 0.8, 0.1])
    assert router_warm_start_probs(TrainConfig(experts=("euler", "heun"))) is None  # base absent
    assert router_warm_start_probs(TrainConfig(experts=("unipc",))) is None  # no router
    assert router_warm_start_probs(TrainConfig(router_warm_start=0)) is None
    assert router_warm_start_probs(TrainConfig(router_warm_start=None)) is None
    with pytest.raises(ValueError, match="router_warm_start"):
        router_warm_start_probs(TrainConfig(router_warm_start=1.0))


def test_warm_start_reaches_the_learner_and_the_env_runners(ray_local, cfg, router_obs, tmp_path):
    from ray.rllib.algorithms.algorithm import Algorithm

    algo = build_config(cfg).build_algo()
    try:  # no weight edit or sync after the build, as in run_training
        learner = learner_router(algo)
        layer = policy_output_layer(learner)
        assert isinstance(learner, WarmStartPPOModule)
        logits = np.log(router_warm_start_probs(cfg))  # log [0.1, 0.8, 0.1]
        assert torch.equal(layer.bias, torch.as_tensor(logits, dtype=torch.float32))
        after = router_probs(learner, router_obs)
        base = after[:, BASE]
        print(
            f"P(unipc) over {len(router_obs)} router observations: {base.mean():.3f} "
            f"(min {base.min():.3f}, max {base.max():.3f})"
        )
        assert base.mean().item() == pytest.approx(0.8, abs=TOLERANCE)
        others = after.mean(0)[[k for k in range(len(EXPERTS)) if k != BASE]]
        assert others.numpy() == pytest.approx([0.1, 0.1], abs=TOLERANCE)
        runners = runner_routers(algo)
        assert len(runners) == 2  # the driver's env runner and the remote one
        for module in runners:
            torch.testing.assert_close(router_probs(module, router_obs), after)

        # The experts' initial spread: log-std outputs log(expert_init_std) for every observation,
        # on the env runners too (RLlib's default is about log(1) = 0).
        def log_stds(module):
            out = module.forward_inference({Columns.OBS: router_obs})[Columns.ACTION_DIST_INPUTS]
            return out[:, 2:].detach()

        expert = "expert_2"  # unipc
        remote = algo.env_runner_group.foreach_env_runner(
            lambda runner: runner.module[expert], local_env_runner=False
        )
        for module in [algo.get_module(expert), *remote]:
            torch.testing.assert_close(
                log_stds(module), torch.full((len(router_obs), 2), float(np.log(0.3)))
            )

        # The env runner samples with it: the env applies router action j as experts[j].
        usage = algo.train()["env_runners"]["rldiff"]["expert_usage"]
        print(f"expert usage, first iteration: { {k: round(v, 3) for k, v in usage.items()} }")
        assert usage["unipc"] == pytest.approx(0.8, abs=0.1)
        assert usage["heun"] + usage["euler"] == pytest.approx(0.2, abs=0.1)
        trained = policy_output_layer(learner_router(algo)).bias.detach().clone()
        algo.save(str(tmp_path / "checkpoint"))
    finally:
        algo.stop()

    # A restore builds warm-started modules, then loads the checkpoint's trained ones over them.
    assert not torch.equal(trained, torch.as_tensor(logits, dtype=torch.float32))  # it learned
    restored = Algorithm.from_checkpoint(str(tmp_path / "checkpoint"))
    try:
        assert torch.equal(policy_output_layer(learner_router(restored)).bias, trained)
    finally:
        restored.stop()


def test_router_entropy_bonus_is_annealed_over_sampled_env_steps():
    from rldiff.rl.algo import router_entropy

    cfg = TrainConfig(iterations=30, train_batch_size=256, router_entropy_coeff=0.2)
    assert router_entropy(cfg) == [[0, 0.2], [20 * 256, 0.01]]  # 2/3 of 30 iterations
    assert router_entropy(dataclasses.replace(cfg, router_entropy_final=None)) == 0.2
    config = build_config(cfg)
    assert config.algorithm_config_overrides_per_module[ROUTER]["entropy_coeff"] == [
        [0, 0.2],
        [5120, 0.01],
    ]
    assert config.get_config_for_module("expert_2").entropy_coeff == cfg.entropy_coeff
