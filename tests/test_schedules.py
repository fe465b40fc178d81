"""Noise schedules: shape, order, endpoints, the published formulas, validation, budgets."""

import math

import pytest
import torch

from rldiff.core.denoisers import Condition
from rldiff.core.noise import DiscreteVP
from rldiff.core.policies import FixedSchedulePolicy, fixed_policy
from rldiff.core.sampler import sample
from rldiff.core.schedules import SCHEDULES, get_schedule, karras, logsnr_uniform
from rldiff.core.solvers import EXPERT_NAMES, steps_for_budget

NOISE = DiscreteVP.linear_betas()
EDM = DiscreteVP(torch.tensor([0.002, 80.0], dtype=torch.float64))  # EDM's range (Karras et al.)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("n", [1, 2, 3, 10, 50])
def test_length_monotone_endpoints(name, n):
    s = get_schedule(name, n, NOISE)
    assert s.dtype == torch.float64
    assert s.shape == (n + 1,)
    assert s[-1] == 0
    assert (s[:-1] > 0).all()
    assert (s[1:] < s[:-1]).all(), s
    assert s[0].item() == pytest.approx(NOISE.sigma_max, rel=1e-12)
    assert (s[:-1] >= NOISE.sigma_min * (1 - 1e-12)).all()


def test_karras_formula_spot_values():
    rho = 7.0
    lo, hi = EDM.sigma_min ** (1 / rho), EDM.sigma_max ** (1 / rho)
    for n in (2, 3, 18):
        s = karras(n, EDM, rho)
        want = [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)] + [0.0]
        assert s.tolist() == pytest.approx(want, rel=1e-13, abs=0)
    # The middle of a 3-point ladder is the rho-mean of the ends, and Karras ends at sigma_min.
    s = karras(3, EDM)
    assert s[1].item() == pytest.approx(((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, rel=1e-13)
    assert s.tolist()[:1] == [80.0] and s[2].item() == pytest.approx(0.002, rel=1e-13)
    assert s[1].item() == pytest.approx(2.5152190, abs=1e-7)  # the literal value
    assert karras(1, NOISE).tolist() == [NOISE.sigma_max, 0.0]
    # rho = 1 is uniform in sigma
    s = karras(5, EDM, rho=1.0)
    assert torch.allclose(s[:-1].diff(), torch.full((4,), (0.002 - 80) / 4, dtype=torch.float64))


def test_logsnr_uniform_is_uniform_in_log_sigma():
    n = 12
    s = logsnr_uniform(n, NOISE)
    h = (s[:-2] / s[1:-1]).log()
    step = math.log(NOISE.sigma_max / NOISE.sigma_min) / n
    assert torch.allclose(h, torch.full_like(h, step), rtol=1e-12, atol=0)
    # it jumps to 0 from its last interior point, one step above sigma_min
    assert s[-2].item() == pytest.approx(NOISE.sigma_min * math.exp(step), rel=1e-12)


def test_time_uniform_follows_the_timestep_map():
    n = 3
    s = get_schedule("time-uniform", n, NOISE)
    t = torch.linspace(NOISE.num_train_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    assert torch.allclose(s[:-1], NOISE.t_to_sigma(t), rtol=1e-14)
    assert torch.allclose(s[:-1], NOISE.sigmas[[999, 666, 333]], rtol=1e-12)


def test_get_schedule_rejects_unknown_and_empty():
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("cosine-ish", 5, NOISE)
    for n in (0, -3):
        with pytest.raises(ValueError, match="at least one step"):
            get_schedule("karras", n, NOISE)


def test_steps_for_budget_formula():
    for budget in range(1, 30):
        assert steps_for_budget("euler", budget) == budget
        assert steps_for_budget("dpmpp-2m", budget) == budget
        assert steps_for_budget("unipc", budget) == budget
        n = steps_for_budget("heun", budget)
        assert 2 * n - 1 <= budget < 2 * (n + 1) - 1  # heun's last step (to 0) is Euler
    assert steps_for_budget("heun", 0) == 1
    with pytest.raises(ValueError, match="unknown solver"):
        steps_for_budget("rk4", 10)


@pytest.mark.parametrize("solver", EXPERT_NAMES)
def test_steps_for_budget_fits_the_sampler(small_gmm, solver):
    """The fixed policy built for a budget spends it fully (or all but Heun's odd one) and never more."""
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = Condition.make(-1, batch=2)
    for budget in (1, 2, 5, 8):
        policy = fixed_policy(solver, "karras", budget, small_gmm.noise_table)
        res = sample(small_gmm, policy, noise, cond, budget)
        want = budget if solver != "heun" else 2 * steps_for_budget(solver, budget) - 1
        assert res.nfe.tolist() == [want, want]
        assert torch.isfinite(res.x0).all()
        # the sampler's own cap never bites: the same schedule with an unlimited budget agrees
        free = sample(
            small_gmm, FixedSchedulePolicy(solver, policy.sigmas, policy.eta), noise, cond, 10**6
        )
        assert free.nfe.tolist() == res.nfe.tolist()
