"""Numerical correctness of the solvers, on the exact Gaussian-mixture denoiser in float64.

1. Convergence order: the error against an independent high-accuracy ODE solution (scipy DOP853)
   falls as N^-p with p the solver's order.
2. Independent implementations: on one fixed schedule every solver reproduces diffusers' scheduler
   of the same method (euler-ancestral and ipndm direct transcriptions of their published formulas).
3. Switching solvers mid-trajectory: iPNDM restarts at first order after a noise injection, and
   takes its past eps where the denoiser was evaluated (not at UniPC's corrected points).
4. Every registered expert: finite, shape- and dtype-preserving steps; a step to 0 returns D.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from rldiff.core.denoisers import Condition
from rldiff.core.noise import DiscreteVP
from rldiff.core.policies import Decision, FixedSchedulePolicy
from rldiff.core.sampler import Sampling, sample
from rldiff.core.schedules import karras
from rldiff.core.seeds import initial_noise, step_generators
from rldiff.core.solvers import EXPERT_NAMES, EXPERTS, History, expert_index

F64 = torch.float64
UNLIMITED = 10**6  # an NFE budget that never binds

# diffusers' schedulers call np.array on torch tensors, which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def _full(b: int, value: float) -> torch.Tensor:
    return torch.full((b,), float(value), dtype=F64)


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


class _StartAt:
    """The same exact denoiser, but the sampler starts at ``sigma_max`` (a scheduler's first sigma)."""

    def __init__(self, inner, sigma_max: float):
        self.inner = inner
        self.noise_table = DiscreteVP(
            torch.tensor([inner.noise_table.sigma_min, sigma_max], dtype=F64)
        )

    def __call__(self, x, sigma, cond):
        return self.inner(x, sigma, cond)


# --------------------------------------------------------------------------- convergence order

ORDER_STEPS = (64, 128, 256, 512)  # the asymptotic regime on this mixture, far above round-off
# ipndm measures 3.77 here: its AB4 is still pre-asymptotic (successive rates 3.66, 3.81, 3.83)
EXPECTED_ORDER = {"euler": 1.0, "heun": 2.0, "dpmpp-2m": 2.0, "unipc": 3.0, "ipndm": 4.0}


def logsnr_ladder(noise: DiscreteVP, n: int) -> torch.Tensor:
    """n steps uniform in log sigma from sigma_max to sigma_min (both included), then the jump to 0."""
    log_sigma = torch.linspace(
        math.log(noise.sigma_max), math.log(noise.sigma_min), n + 1, dtype=F64
    )
    return torch.cat([log_sigma.exp(), torch.zeros(1, dtype=F64)])


@pytest.fixture(scope="module")
def ode_problem(small_gmm):
    """Noise, conditions and the reference x0: dx/dlog(sigma) = x - D(x, sigma) integrated by scipy's
    DOP853 from sigma_max to sigma_min, then x0 = D(x, sigma_min) (every solver's final jump)."""
    b = 8
    noise = initial_noise(range(b), (4,), F64)
    cond = Condition.make([-1, -1, -1, -1, -1, 0, 1, 2], [1, 1, 1, 1, 1, 1, 1.5, 1])
    s_max, s_min = small_gmm.noise_table.sigma_max, small_gmm.noise_table.sigma_min

    def rhs(log_sigma, y):
        x = torch.from_numpy(y).view(b, 4)
        return (x - small_gmm(x, _full(b, math.exp(log_sigma)), cond)).reshape(-1).numpy()

    sol = solve_ivp(
        rhs,
        (math.log(s_max), math.log(s_min)),
        (noise * s_max).reshape(-1).numpy(),
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
    )
    assert sol.success, sol.message
    x_min = torch.from_numpy(sol.y[:, -1].copy()).view(b, 4)
    return small_gmm, noise, cond, small_gmm(x_min, _full(b, s_min), cond)


@pytest.mark.parametrize("solver", list(EXPECTED_ORDER))
def test_convergence_order(ode_problem, solver):
    gmm, noise, cond, reference = ode_problem
    errors = []
    for n in ORDER_STEPS:
        res = sample(
            gmm, FixedSchedulePolicy(solver, logsnr_ladder(gmm.noise_table, n)), noise, cond, 10**6
        )
        steps = n + 1  # n inside the range, then the jump to 0
        nfe = 2 * steps - 1 if solver == "heun" else steps
        assert res.nfe.tolist() == [nfe] * len(noise)
        errors.append(_rms(res.x0 - reference))
    slope = -np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0]
    print(
        f"\n[order] {solver}: slope {slope:.3f} (expected {EXPECTED_ORDER[solver]:.0f}); "
        f"RMS errors {', '.join(f'N={n}: {e:.2e}' for n, e in zip(ORDER_STEPS, errors, strict=True))}"
    )
    assert min(errors) > 1e-9  # far above float64 round-off: the slope measures truncation error
    assert errors == sorted(errors, reverse=True)
    assert abs(slope - EXPECTED_ORDER[solver]) < 0.3


def test_euler_ancestral_without_noise_is_euler(ode_problem):
    gmm, noise, cond, _ = ode_problem
    for sigmas in (logsnr_ladder(gmm.noise_table, 16), karras(7, gmm.noise_table)):
        euler = sample(gmm, FixedSchedulePolicy("euler", sigmas), noise, cond, UNLIMITED)
        ancestral = sample(
            gmm, FixedSchedulePolicy("euler-ancestral", sigmas, eta=0.0), noise, cond, UNLIMITED
        )
        assert torch.equal(euler.x0, ancestral.x0)
        assert torch.equal(euler.nfe, ancestral.nfe)


# --------------------------------------------------------------------- diffusers as a reference

BETAS = dict(
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
)
DIFFUSERS_TOL = 1e-4


def _scheduler(case: str):
    """A diffusers scheduler with its timesteps set, and the matching solver name."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    karras_sigmas = case.endswith("karras")
    if case == "euler":
        s = EulerDiscreteScheduler(**BETAS, final_sigmas_type="zero")
        s.set_timesteps(10)
        return "euler", s
    if case == "euler-custom-sigmas":  # our own Karras ladder, handed to diffusers
        s = EulerDiscreteScheduler(**BETAS, final_sigmas_type="zero")
        s.set_timesteps(sigmas=karras(10, DiscreteVP.linear_betas()).tolist())
        return "euler", s
    if case.startswith("heun"):
        s = HeunDiscreteScheduler(**BETAS, use_karras_sigmas=karras_sigmas)
        s.set_timesteps(10)
        return "heun", s
    if case.startswith("dpmpp-2m"):
        s = DPMSolverMultistepScheduler(
            **BETAS,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=False,  # else < 15 steps also drop to first order one step early
            final_sigmas_type="zero",  # the last step (to 0) is first order, as ours
            use_karras_sigmas=karras_sigmas,
        )
        s.set_timesteps(12)
        return "dpmpp-2m", s
    if case.startswith("unipc"):
        s = UniPCMultistepScheduler(
            **BETAS,
            solver_type="bh2",
            solver_order=2,
            predict_x0=True,
            lower_order_final=True,  # UniP-2 cannot step to sigma = 0; the last step is first order
            final_sigmas_type="zero",
            use_karras_sigmas=karras_sigmas,
        )
        s.set_timesteps(12)
        return "unipc", s
    raise AssertionError(case)


def _our_sigmas(solver: str, scheduler) -> torch.Tensor:
    sigmas = scheduler.sigmas.to(F64)
    if (
        solver == "heun"
    ):  # diffusers repeats every interior sigma: [s0, s1, s1, ..., s_n-1, s_n-1, 0]
        sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
    return sigmas


def _run_diffusers(scheduler, gmm, x_edm: torch.Tensor, cond: Condition, vp: bool) -> torch.Tensor:
    """The usual diffusers loop around an epsilon model built from the exact denoiser.

    The model sees the VP input (``scale_model_input`` divides Euler/Heun's EDM sample by
    sqrt(sigma^2 + 1); DPM-Solver/UniPC carry the VP sample itself) and returns
    eps = (x_edm - D(x_edm, sigma)) / sigma."""
    b = len(x_edm)
    sigma_0 = scheduler.sigmas[0].to(F64)
    x = x_edm / (1 + sigma_0**2).sqrt() if vp else x_edm.clone()
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        sigma = scheduler.sigmas[scheduler.step_index or 0].to(F64).expand(b)
        x_in = model_input * (1 + sigma**2).sqrt().view(b, 1)
        eps = (x_in - gmm(x_in, sigma, cond)) / sigma.view(b, 1)
        x = scheduler.step(eps, t, x).prev_sample
    return x  # at sigma = 0 the VP and EDM samples coincide


@pytest.mark.parametrize(
    "case",
    [
        "euler",
        "euler-custom-sigmas",
        "heun",
        "heun-karras",
        "dpmpp-2m",
        "dpmpp-2m-karras",
        "unipc",
        "unipc-karras",
    ],
)
def test_matches_diffusers(small_gmm, case):
    solver, scheduler = _scheduler(case)
    sigmas = _our_sigmas(solver, scheduler)
    assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    b = 6
    noise = initial_noise(range(10, 10 + b), (4,), F64)
    cond = Condition.make([-1, -1, 0, 1, 2, -1], [1, 1, 1, 2.0, 0.5, 1])
    gmm = _StartAt(small_gmm, float(sigmas[0]))
    ours = sample(gmm, FixedSchedulePolicy(solver, sigmas), noise, cond, UNLIMITED)
    theirs = _run_diffusers(
        scheduler, small_gmm, noise * float(sigmas[0]), cond, vp=solver in ("dpmpp-2m", "unipc")
    )
    steps = len(sigmas) - 1
    assert ours.nfe.tolist() == [2 * steps - 1 if solver == "heun" else steps] * b
    assert len(scheduler.timesteps) == ours.nfe[0]  # diffusers made as many model calls
    deviation = (ours.x0 - theirs).abs().max().item()
    print(f"\n[diffusers] {case}: {steps} steps, max |ours - diffusers| = {deviation:.2e}")
    assert torch.isfinite(theirs).all()
    assert theirs.abs().max() > 0.1  # values of order 1
    assert deviation < DIFFUSERS_TOL


class _TablePolicy:
    """One expert on a fixed schedule, with a per-sample noise amount eta."""

    name = "table"

    def __init__(self, solver: str, sigmas: torch.Tensor, etas):
        self.expert, self.sigmas = expert_index(solver), sigmas
        self.etas = torch.as_tensor(etas, dtype=F64)

    def act(self, obs):
        nxt = self.sigmas[(obs.step + 1).clamp_max(len(self.sigmas) - 1)]
        b = len(obs.index)
        return Decision(torch.full((b,), self.expert), nxt, self.etas[obs.index])


def _ancestral_reference(gmm, sigmas, x, cond, etas, seeds):
    """k-diffusion's ``sample_euler_ancestral`` transcribed, one sample at a time, in Python floats
    for the step sizes; noise from each sample's own stream (rldiff.core.seeds.step_generators)."""
    out = []
    for i, (eta, gen) in enumerate(zip(etas, step_generators(seeds), strict=True)):
        xi = x[i : i + 1].clone()
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
            d = (xi - gmm(xi, _full(1, s), cond[i : i + 1])) / s
            sigma_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
            sigma_down = math.sqrt(s_next**2 - sigma_up**2)
            xi = xi + d * (sigma_down - s)
            if eta > 0:
                xi = xi + torch.randn(xi.shape[1:], generator=gen, dtype=F64) * sigma_up
        out.append(xi)
    return torch.cat(out)


def test_euler_ancestral_matches_the_published_formula(small_gmm):
    b = 5
    seeds = [3, 14, 15, 92, 65]
    etas = [0.0, 0.3, 1.0, 0.7, 1.0]
    noise = initial_noise(seeds, (4,), F64)
    cond = Condition.make([-1, 0, 1, 2, -1], [1, 1, 1.5, 1, 1])
    sigmas = karras(9, small_gmm.noise_table)
    ours = sample(
        small_gmm, _TablePolicy("euler-ancestral", sigmas, etas), noise, cond, 10**6, seeds
    )
    reference = _ancestral_reference(
        small_gmm, sigmas, noise * small_gmm.noise_table.sigma_max, cond, etas, seeds
    )
    deviation = (ours.x0 - reference).abs().max().item()
    print(f"\n[reference] euler-ancestral vs transcription: max deviation {deviation:.2e}")
    assert deviation < 1e-10
    assert ours.nfe.tolist() == [len(sigmas) - 1] * b
    # the noise really enters: eta changes the result, and a different seed does too
    others = sample(
        small_gmm, _TablePolicy("euler-ancestral", sigmas, etas), noise, cond, 10**6, [0] * b
    )
    assert torch.equal(others.x0[0], ours.x0[0])  # eta = 0 draws nothing
    assert (others.x0[1:] - ours.x0[1:]).abs().amax(1).min() > 1e-3


def test_euler_ancestral_matches_diffusers(small_gmm):
    """eta = 1 is diffusers' EulerAncestralDiscreteScheduler; a list of per-sample generators makes it
    draw each sample's noise from its own stream, as the sampler does."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(**BETAS)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.to(F64)
    seeds = [5, 6, 7, 8]
    b = len(seeds)
    noise = initial_noise(seeds, (4,), F64)
    cond = Condition.make([-1, 0, 1, -1], [1, 1, 2.0, 1])
    gmm = _StartAt(small_gmm, float(sigmas[0]))
    policy = FixedSchedulePolicy("euler-ancestral", sigmas, eta=1.0)
    ours = sample(gmm, policy, noise, cond, UNLIMITED, seeds)
    x = noise * float(sigmas[0])
    generators = step_generators(seeds)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        sigma = scheduler.sigmas[scheduler.step_index].to(F64).expand(b)
        x_in = model_input * (1 + sigma**2).sqrt().view(b, 1)
        eps = (x_in - small_gmm(x_in, sigma, cond)) / sigma.view(b, 1)
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
    deviation = (ours.x0 - x).abs().max().item()
    print(f"\n[diffusers] euler-ancestral (eta=1): max |ours - diffusers| = {deviation:.2e}")
    assert deviation < DIFFUSERS_TOL


def _ipndm_reference(gmm, sigmas, x, cond):
    """iPNDM with its published fixed coefficients (Zhang & Chen, 2023, DEIS; diff-sampler's iPNDM)
    on a grid uniform in sigma: Adams-Bashforth on eps = (x - D) / sigma, warm-started at orders
    1, 2, 3, then 4; the final jump x0 = D(x, sigma_min)."""
    coefficients = ([1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55, -59, 37, -9])
    coefficients = (*coefficients[:3], [c / 24 for c in coefficients[3]])
    b, past = len(x), []
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        past = [(x - gmm(x, _full(b, s), cond)) / s, *past[:3]]
        x = x + (s_next - s) * sum(
            c * e for c, e in zip(coefficients[len(past) - 1], past, strict=True)
        )
    return gmm(x, _full(b, sigmas[-1]), cond)


def test_ipndm_matches_the_published_formula(small_gmm):
    b, n = 6, 12
    noise = initial_noise(range(20, 20 + b), (4,), F64)
    cond = Condition.make([-1, -1, 0, 1, 2, -1], [1, 1, 1, 2.0, 0.5, 1])
    table = small_gmm.noise_table
    sigmas = torch.linspace(table.sigma_max, table.sigma_min, n + 1, dtype=F64)
    ours = sample(
        small_gmm,
        FixedSchedulePolicy("ipndm", torch.cat([sigmas, torch.zeros(1, dtype=F64)])),
        noise,
        cond,
        UNLIMITED,
    )
    reference = _ipndm_reference(small_gmm, sigmas, noise * table.sigma_max, cond)
    deviation = (ours.x0 - reference).abs().max().item()
    print(f"\n[reference] ipndm vs fixed-coefficient transcription: max deviation {deviation:.2e}")
    assert ours.nfe.tolist() == [n + 1] * b
    assert reference.abs().max() > 0.1
    assert deviation < 1e-10


# ------------------------------------------------------------------ switching mid-trajectory


class _PlanPolicy:
    """A fixed schedule whose step k takes expert ``plan[k]`` with noise amount ``etas[k]``."""

    name = "plan"

    def __init__(self, sigmas: torch.Tensor, plan: list[str], etas: list[float]):
        self.sigmas, self.plan, self.etas = sigmas, plan, etas

    def act(self, obs):
        k, b = int(obs.step[0]), len(obs.index)
        expert = torch.full((b,), expert_index(self.plan[k]))
        return Decision(expert, self.sigmas[k + 1].expand(b), torch.full((b,), self.etas[k]))


@pytest.mark.parametrize("eta", [0.8, 0.0])
def test_ipndm_after_a_noise_injection_is_first_order(small_gmm, eta):
    """Steps alternate between ipndm and euler-ancestral: with noise injected, every ipndm step is
    an Euler step (its past eps belong to another trajectory); without, it uses them."""
    seeds = [1, 2, 3, 4]
    noise = initial_noise(seeds, (4,), F64)
    cond = Condition.make([-1, 0, 1, 2], [1, 1, 1.5, 1])
    sigmas = karras(10, small_gmm.noise_table)

    def run(solver):
        plan = [solver if k % 2 == 0 else "euler-ancestral" for k in range(10)]
        policy = _PlanPolicy(sigmas, plan, [eta] * 10)
        return sample(small_gmm, policy, noise, cond, UNLIMITED, seeds).x0

    ipndm, euler = run("ipndm"), run("euler")
    assert torch.isfinite(ipndm).all()
    if eta > 0:
        assert torch.allclose(ipndm, euler, rtol=0, atol=1e-12)
    else:
        assert (ipndm - euler).abs().max() > 1e-3


def test_ipndm_after_unipc_uses_eps_at_the_evaluation_points(small_gmm):
    """Three UniPC steps, then one iPNDM step of order 4, against x + sum_j c_j eps_j with eps_j
    taken at the points the denoiser saw and c_j the integrals of scipy's Lagrange basis."""
    from scipy.interpolate import lagrange

    b = 4
    noise = initial_noise(range(30, 30 + b), (4,), F64)
    cond = Condition.make([-1, 0, 1, 2], [1, 1, 1.5, 1])
    sigmas = karras(8, small_gmm.noise_table)
    batch = Sampling(small_gmm, noise, cond, UNLIMITED)
    points, starts = [], []
    for k, solver in enumerate(["unipc"] * 3 + ["ipndm"]):
        batch.observe()
        points.append(batch.x.clone())
        batch.advance(
            Decision(
                torch.full((b,), expert_index(solver)), sigmas[k + 1].expand(b), torch.zeros(b)
            )
        )
        starts.append(batch.history.x_start.clone())
    assert (starts[2] - points[2]).abs().max() > 1e-6  # UniC moved the start of its step

    nodes = sigmas[:4].flip(0).tolist()  # newest first
    x_next = points[3].clone()
    for j, s in enumerate(nodes):
        basis = lagrange(nodes, np.eye(4)[j]).integ()
        c = basis(float(sigmas[4])) - basis(nodes[0])
        p = points[3 - j]
        x_next += c * (p - small_gmm(p, _full(b, s), cond)) / s
    deviation = (batch.x - x_next).abs().max().item()
    print(f"\n[reference] ipndm after unipc vs scipy Lagrange: max deviation {deviation:.2e}")
    assert deviation < 1e-10


# ------------------------------------------------------------------------ every registered expert


def _drive(expert, x, sigma, sigma_next, denoised, history, eta, noise, denoiser, cond):
    """Runs one step, serving its further evaluations (if it is a generator) with ``denoiser``."""
    out = expert.step(x, sigma, sigma_next, denoised, history, eta, noise)
    if not hasattr(out, "send"):
        return out, 0
    calls, value = 0, None
    while True:
        try:
            rows, x_req, sigma_req = out.send(value)
        except StopIteration as done:
            return done.value, calls
        calls += 1
        value = denoiser(x_req, sigma_req, cond[rows])


def _history(gmm, x, sigma, cond, depth: int, dtype) -> History:
    """A history of ``depth`` past ODE steps ending at ``sigma``, built from true denoised values."""
    b = len(x)
    h = History.empty(b, tuple(x.shape[1:]), dtype)
    rows = torch.arange(b)
    for k in range(depth, 0, -1):
        s = sigma * 1.3**k
        start = (x * 1.3**k).to(dtype)
        denoised = gmm(start.to(F64), s, cond).to(dtype)
        h.push(rows, start, start, s, denoised, torch.ones(b, dtype=torch.bool))
    return h


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("name", EXPERT_NAMES)
def test_every_expert_one_step(small_gmm, name, depth, dtype):
    expert = EXPERTS[expert_index(name)]
    assert expert.name == name and expert.extra_nfe >= 0
    b = 5
    g = torch.Generator().manual_seed(depth)
    sigma = torch.tensor([50.0, 5.0, 1.0, 0.3, 0.02], dtype=F64)
    x = (small_gmm.sample_data(torch.tensor([0, 1, 2, 0, 1]), g) + sigma.view(b, 1) * 0.5).to(dtype)
    cond = Condition.make([-1, 0, 1, 2, -1], [1, 1, 2.0, 1, 1])

    def denoiser(x_, s_, c_):
        return small_gmm(x_.to(F64), s_, c_).to(x_.dtype)

    history = _history(small_gmm, x.to(F64), sigma, cond, depth, dtype)
    denoised = denoiser(x, sigma, cond)
    eta = torch.full((b,), 0.5 if expert.stochastic else 0.0, dtype=F64)
    fresh = torch.randn(x.shape, generator=g, dtype=F64).to(dtype) if expert.stochastic else None

    # a step inside the range: finite, same shape and dtype, the input untouched
    x_before = x.clone()
    (x_next, x_start), calls = _drive(
        expert, x, sigma, sigma * 0.7, denoised, history, eta, fresh, denoiser, cond
    )
    assert torch.equal(x, x_before)
    assert calls == expert.extra_nfe
    for t in (x_next, x_start):
        assert t.shape == x.shape and t.dtype == dtype and torch.isfinite(t).all()
    if depth == 0 and not expert.stochastic:  # a one-step ODE step moves toward D
        assert ((x_next - denoised).norm(dim=1) < (x - denoised).norm(dim=1)).all()

    # a step to sigma = 0 returns the denoised estimate (ancestral adds no noise there)
    zero = torch.zeros(b, dtype=F64)
    (x_last, _), calls = _drive(
        expert, x, sigma, zero, denoised, history, eta, fresh, denoiser, cond
    )
    assert calls == 0
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(x_last, denoised, rtol=tol, atol=tol * 10)
    assert x_last.dtype == dtype


@pytest.mark.parametrize("name", EXPERT_NAMES)
def test_every_expert_samples_finite_in_the_sampler(digits_gmm, name):
    b = 3
    noise = initial_noise(range(b), digits_gmm.sample_shape, F64)
    cond = Condition.make([-1, 3, 7], [1, 1, 2.0])
    eta = 1.0 if EXPERTS[expert_index(name)].stochastic else 0.0
    res = sample(
        digits_gmm,
        FixedSchedulePolicy(name, karras(6, digits_gmm.noise_table), eta),
        noise,
        cond,
        100,
    )
    assert res.x0.shape == noise.shape and res.x0.dtype == F64
    assert torch.isfinite(res.x0).all()
    assert res.x0.abs().max() < 5  # the digits live in [-1, 1]; a sample is near them
