"""The warm starts: a fresh Algorithm's router picks the base expert with probability
``router_warm_start`` (on average over observations), and the experts' Gaussians start with std
``expert_init_std``, in the learner AND on the env runners."""

import dataclasses

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from rldiff.algo import (
    ROUTER,
    TrainConfig,
    build_config,
    policy_output_layer,
    router_warm_start_probs,
    warm_start_experts,
    warm_start_router,
)
from rldiff.env import RoutingEnv, training_references
from rldiff.models import load_model

EXPERTS = ("heun", "unipc", "euler")  # a subset, base expert (unipc) at router action 1
BASE = EXPERTS.index("unipc")
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
def router_obs(cfg) -> torch.Tensor:
    """Router observations of one episode at every step (random routing, zero expert actions)."""
    training_references(load_model(cfg.model), cfg.env_config())  # cached for the env runner too
    env = RoutingEnv(cfg.env_config())
    obs, _ = env.reset(seed=3)
    rng, seen = np.random.default_rng(0), []
    while obs:
        seen += [o for a, o in obs.items() if a.startswith("router_")]
        actions = {
            a: int(rng.integers(len(EXPERTS))) if a.startswith("router_") else np.zeros(2, "f4")
            for a in obs
        }
        obs, *_ = env.step(actions)
    return torch.as_tensor(np.stack(seen))


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
    np.testing.assert_allclose(full, [0.1, 0.1, 0.6, 0.1, 0.1])  # unipc is expert 2 of 5
    sub = router_warm_start_probs(TrainConfig(experts=EXPERTS, base_expert="unipc"))
    np.testing.assert_allclose(sub, [0.1, 0.8, 0.1])
    assert router_warm_start_probs(TrainConfig(experts=("euler", "heun"))) is None  # base absent
    assert router_warm_start_probs(TrainConfig(experts=("unipc",))) is None  # no router
    assert router_warm_start_probs(TrainConfig(router_warm_start=0)) is None
    assert router_warm_start_probs(TrainConfig(router_warm_start=None)) is None
    with pytest.raises(ValueError, match="router_warm_start"):
        router_warm_start_probs(TrainConfig(router_warm_start=1.0))


def test_warm_start_reaches_the_learner_and_the_env_runners(ray_local, cfg, router_obs):
    algo = build_config(cfg).build_algo()
    try:  # no call to the env runners before the warm start, as in run_training
        learner = learner_router(algo)
        layer = policy_output_layer(learner)
        weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
        before = router_probs(learner, router_obs)[:, BASE]
        assert abs(before.mean().item() - 0.8) > 0.3  # about uniform

        # Off: nothing changes.
        assert warm_start_router(algo, dataclasses.replace(cfg, router_warm_start=0)) is None
        assert torch.equal(layer.bias, bias) and torch.equal(layer.weight, weight)

        # On: only the output layer's bias moves; every copy of the router agrees.
        target = warm_start_router(algo, cfg)
        assert target == pytest.approx({"heun": 0.1, "unipc": 0.8, "euler": 0.1})
        assert torch.equal(layer.weight, weight)
        torch.testing.assert_close(layer.bias, torch.log(torch.tensor([0.1, 0.8, 0.1])))
        after = router_probs(learner, router_obs)
        base = after[:, BASE]
        print(
            f"P(unipc) over {len(router_obs)} router observations: before {before.mean():.3f}, "
            f"after {base.mean():.3f} (min {base.min():.3f}, max {base.max():.3f})"
        )
        assert base.mean().item() == pytest.approx(0.8, abs=TOLERANCE)
        others = after.mean(0)[[k for k in range(len(EXPERTS)) if k != BASE]]
        assert others.numpy() == pytest.approx([0.1, 0.1], abs=TOLERANCE)
        runners = runner_routers(algo)
        assert len(runners) == 2  # the driver's env runner and the remote one
        for module in runners:
            torch.testing.assert_close(router_probs(module, router_obs), after)

        # The experts' initial spread: log-std outputs log(expert_init_std) for every observation,
        # on the env runners too; RLlib's default is about log(1) = 0.
        def log_stds(module):
            out = module.forward_inference({Columns.OBS: router_obs})[Columns.ACTION_DIST_INPUTS]
            return out[:, 2:].detach()

        expert = "expert_2"  # unipc
        assert log_stds(algo.get_module(expert)).abs().mean() < 0.5
        warm_start_experts(algo, dataclasses.replace(cfg, expert_init_std=0.3))
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
    finally:
        algo.stop()


def test_router_entropy_bonus_is_annealed_over_sampled_env_steps():
    from rldiff.algo import router_entropy

    cfg = TrainConfig(iterations=30, train_batch_size=256, router_entropy_coeff=0.2)
    assert router_entropy(cfg) == [[0, 0.2], [20 * 256, 0.01]]  # 2/3 of 30 iterations
    assert router_entropy(dataclasses.replace(cfg, router_entropy_final=None)) == 0.2
    config = build_config(cfg)
    assert config.algorithm_config_overrides_per_module[ROUTER]["entropy_coeff"] == [
        [0, 0.2],
        [5120, 0.01],
    ]
    assert config.get_config_for_module("expert_2").entropy_coeff == cfg.entropy_coeff
