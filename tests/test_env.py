"""The routing env (multi-agent checks, budgets, base schedule, reward) and a PPO smoke run."""

import numpy as np
import pytest
import torch

from rldiff.core.policies import FixedSchedulePolicy
from rldiff.core.routing import (
    N_EXPERTS,
    OBS_DIM,
    BaseSchedule,
    BaseSchedulePolicy,
    decision_from_actions,
    one_step_along,
)
from rldiff.core.sampler import sample
from rldiff.core.schedules import get_schedule
from rldiff.core.solvers import EXPERT_NAMES, expert_index
from rldiff.rl.env import RoutingEnv
from rldiff.rl.rows import ACTS, REWARD, ROW_WIDTH

UNIPC = expert_index("unipc")


@pytest.fixture(scope="session")
def env_config(tmp_path_factory):
    return {
        "model": "gmm",
        "batch_size": 12,
        "n_train": 24,
        "cache": str(tmp_path_factory.mktemp("rldiff-cache")),
        "reference_steps": 100,
    }


def rollout(env, router, expert_action, seed=0):
    """Runs one episode; ``router(aid)`` / ``expert_action(aid)`` pick each agent's actions for
    the whole batch. Returns each agent's per-sample returns (the sum of its observations'
    ``REWARD`` column), the terminated agents and the number of env steps."""
    obs, _ = env.reset(seed=seed)
    returns, terminated, steps = {}, set(), 0
    while True:
        actions = {aid: router(aid) if aid == "router" else expert_action(aid) for aid in obs}
        assert not terminated & set(actions), "a finished agent acted"
        obs, rewards, terms, truncs, _ = env.step(actions)
        steps += 1
        for aid, o in obs.items():
            returns[aid] = returns.get(aid, 0.0) + o[:, REWARD].astype(np.float64)
        terminated |= {aid for aid, t in terms.items() if t and aid != "__all__"}
        assert not truncs["__all__"]
        if terms["__all__"]:
            return returns, terminated, steps


def zeros(env):
    """Zero expert actions for the whole batch."""
    return lambda aid: np.zeros((env.batch_size, 2), np.float32)


def constant(env, action):
    """The same router action for every sample."""
    return lambda aid: np.full(env.batch_size, action)


def test_passes_rllib_multiagent_checks(env_config):
    from ray.rllib.utils.pre_checks.env import check_multiagent_environments

    env = RoutingEnv(env_config)
    check_multiagent_environments(env)
    b = env.batch_size
    assert env.possible_agents == ["router", *(f"expert{k}" for k in range(N_EXPERTS))]
    assert env.observation_spaces["router"].shape == (b, ROW_WIDTH) and ROW_WIDTH > OBS_DIM
    assert list(env.action_spaces["router"].nvec) == [N_EXPERTS] * b
    assert env.action_spaces[f"expert{N_EXPERTS - 1}"].shape == (b, 2)


def test_random_rollout_respects_budgets(env_config):
    env = RoutingEnv(env_config)
    space = env.action_spaces
    returns, terminated, steps = rollout(
        env, lambda a: space[a].sample(), lambda a: space[a].sample(), seed=3
    )
    assert env.batch.done and steps % 2 == 0
    assert (env.batch.nfe <= env.budget).all() and (env.batch.nfe >= 1).all()
    assert all(s < env_config["n_train"] for s in env.seeds)  # training seeds only
    assert terminated == set(env.possible_agents)
    r = env._rewards().numpy()  # each sample's reward: its router row and each acting expert's
    np.testing.assert_allclose(returns["router"], r, rtol=1e-6, atol=1e-6)
    for j, k in enumerate(env.experts):
        expected = np.where(env.acted[j], r, 0.0)
        np.testing.assert_allclose(returns[f"expert{k}"], expected, rtol=1e-6, atol=1e-6)
    assert env.acted.any(0).all() and (r >= -2.0).all() and (r <= 2.0).all()
    usage = [env.summary[f"expert_usage/{n}"] for n in EXPERT_NAMES]
    assert sum(usage) == pytest.approx(1.0) and env.summary["nfe_mean"] <= 10


@pytest.mark.parametrize("schedules", [None, "karras"])
def test_zero_actions_reproduce_the_base_schedule(env_config, schedules):
    """Router on the base expert, zero expert actions: the base schedule itself, reward -cost*NFE."""
    budgets = env_config.get("budgets", [3, 4, 5, 6, 8, 10])
    env = RoutingEnv(env_config)
    noise_table = env.denoiser.noise_table
    table = {b: get_schedule(schedules or "logsnr-uniform", b, noise_table) for b in budgets}
    cfg = {**env_config, "cost_per_nfe": 0.01}
    if schedules:
        cfg["base_schedules"] = {str(b): s.tolist() for b, s in table.items()}  # JSON-ish keys
    env = RoutingEnv(cfg)
    returns, _, _ = rollout(env, constant(env, UNIPC), zeros(env))
    x0 = env.batch.x

    base = sample(env.denoiser, env.base_policy, env.noise, env.cond, env.budget, env.seeds)
    assert torch.equal(x0, base.x0)  # the same rule, the same numbers
    width = max(len(s) for s in table.values())
    padded = torch.stack(
        [torch.nn.functional.pad(table[b], (0, width - len(table[b]))) for b in env.budget.tolist()]
    )
    fixed = sample(
        env.denoiser, FixedSchedulePolicy("unipc", padded), env.noise, env.cond, env.budget
    )
    assert torch.equal(env.batch.nfe, env.budget)
    if schedules:  # sigma_next = base * exp(-0): bit for bit
        assert torch.equal(x0, fixed.x0)
    else:  # exp(-h) steps vs a linspace in log sigma: equal up to rounding
        torch.testing.assert_close(x0, fixed.x0, rtol=0, atol=1e-5)
    expected = -0.01 * env.budget.double()
    np.testing.assert_allclose(returns["router"], expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(returns[f"expert{UNIPC}"], expected.numpy(), rtol=0, atol=1e-6)


def test_step_action_scales_the_log_step(env_config):
    env = RoutingEnv(env_config)
    env.reset(seed=1)
    obs, b = env.obs, env.batch_size
    base_next = BaseSchedule().sigma_next(obs)
    h_base = (obs.sigma / base_next).log()
    span = (obs.sigma / obs.sigma_min).log()
    r = BaseSchedule().step_range
    for a, factor in [(1.0, r), (-1.0, 1 / r), (0.5, r**0.5)]:
        actions = np.tile([a, 0.0], (b, 1))
        d = decision_from_actions(obs, [UNIPC] * b, actions, BaseSchedule())
        inside = h_base * factor < span * (1 - 1e-9)  # a step past sigma_min jumps to 0
        assert (d.sigma_next[~inside] == 0).all() and inside.any()
        torch.testing.assert_close(
            (obs.sigma / d.sigma_next).log()[inside], (h_base * factor)[inside]
        )
    stochastic = decision_from_actions(
        obs, [expert_index("euler-ancestral")] * b, np.tile([0.0, 0.5], (b, 1)), BaseSchedule()
    )
    assert torch.allclose(stochastic.eta, torch.full((b,), 0.75, dtype=torch.float64))
    policy = BaseSchedulePolicy("unipc", BaseSchedule())
    assert torch.equal(policy.act(obs).sigma_next, base_next)


def tiny_config(tiny_train_config, env_config, **changes):
    """The tests' tiny training config on this module's env settings (every budget)."""
    from rldiff.config import TrainConfig

    return tiny_train_config(
        env_config["cache"],
        n_train=env_config["n_train"],
        reference_steps=env_config["reference_steps"],
        budgets=TrainConfig().budgets,
        **changes,
    )


def test_ppo_smoke_two_iterations(ray_local, env_config, tiny_train_config):
    from rldiff.rl.algo import build_config, policy_mapping_fn

    assert policy_mapping_fn("router", None) == "router"
    assert policy_mapping_fn("expert4", None) == "expert_4"
    cfg = tiny_config(tiny_train_config, env_config, cost_per_nfe=(0.0, 0.01))
    algo = build_config(cfg).build_algo()
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    metrics = results[-1]["env_runners"]["rldiff"]
    for key in ("rmse_mean", "rmse_base_mean", "nfe_mean", "reward_mean", "router_entropy"):
        assert np.isfinite(metrics[key]), key
    usage = [metrics["expert_usage"][n] for n in EXPERT_NAMES]
    assert sum(usage) == pytest.approx(1.0)
    assert 0 < metrics["router_entropy"] <= np.log(N_EXPERTS) + 1e-6
    assert "router" in results[-1]["learners"]


def test_single_expert_has_no_router(env_config):
    """experts=["unipc"]: only unipc's agent, one env step per sampler step, zero actions = base."""
    from ray.rllib.utils.pre_checks.env import check_multiagent_environments

    env = RoutingEnv({**env_config, "experts": ["unipc"]})
    check_multiagent_environments(env)
    assert env.possible_agents == [f"expert{UNIPC}"]
    obs, _ = env.reset(seed=0)
    assert set(obs) == set(env.possible_agents) and (obs[f"expert{UNIPC}"][:, ACTS] == 1).all()
    returns, terminated, steps = rollout(env, None, zeros(env))
    assert terminated == set(env.possible_agents) and steps == len(env.batch.steps)
    assert torch.equal(env.batch.nfe, env.budget)
    base = sample(env.denoiser, env.base_policy, env.noise, env.cond, env.budget, env.seeds)
    assert torch.equal(env.batch.x, base.x0)
    # 0 up to rounding: the cached base RMSE may come from a differently composed batch
    assert np.abs(returns[f"expert{UNIPC}"]).max() < 1e-5
    assert env.summary["expert_usage/unipc"] == 1.0


def test_expert_subset_maps_router_actions(env_config):
    env = RoutingEnv({**env_config, "experts": ["heun", "euler"]})
    assert list(env.action_spaces["router"].nvec) == [2] * env.batch_size
    assert env.possible_agents == ["router", "expert3", "expert0"]
    rollout(env, constant(env, 1), zeros(env))  # router action 1 -> euler
    assert env.summary["expert_usage/euler"] == 1.0


def test_ppo_single_expert_smoke(ray_local, env_config, tiny_train_config):
    from rldiff.rl.algo import build_config, module_ids

    assert module_ids(["unipc"]) == (f"expert_{UNIPC}",)
    assert module_ids(["unipc", "euler"]) == ("router", f"expert_{UNIPC}", "expert_0")
    cfg = tiny_config(
        tiny_train_config,
        env_config,
        experts=("unipc",),
        train_batch_size=32,
        minibatch_size=32,
    )
    config = build_config(cfg)
    assert set(config.rl_module_spec.rl_module_specs) == {f"expert_{UNIPC}"}
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    metrics = results[-1]["env_runners"]["rldiff"]
    assert metrics["expert_usage"]["unipc"] == pytest.approx(1.0)
    assert "router_entropy" not in metrics and np.isfinite(metrics["reward_mean"])
    assert set(results[-1]["learners"]) >= {f"expert_{UNIPC}"}
    assert "router" not in results[-1]["learners"]


def test_one_step_along_keeps_the_fractional_position():
    table = torch.tensor([157.0, 20.0, 3.0, 0.5, 0.0], dtype=torch.float64)
    on_points = one_step_along(table, table[:-1].clone())
    assert torch.equal(on_points, table[1:])  # exactly the next point, then the jump
    just_above = one_step_along(table, torch.tensor([21.0], dtype=torch.float64))
    assert 3.0 < float(just_above) < 3.5  # a full base step, not a tiny one down to 20
    between_last = one_step_along(table, torch.tensor([2.9, 1.0], dtype=torch.float64))
    assert torch.equal(between_last, torch.tensor([0.5, 0.5], dtype=torch.float64))
    past_last = one_step_along(table, torch.tensor([0.4], dtype=torch.float64))
    assert float(past_last) == 0.0
