"""One-step solvers with per-sample sigmas and a solver-agnostic multistep history.

Every step has one signature, ``step(x, sigma, sigma_next, denoised, history, eta, noise)``, over
tensors of the samples that use it; ``denoised = D(x, sigma)`` is evaluated by the sampler before
the step (it is shared by all solvers). A step that needs further evaluations is a generator that
yields ``(rows, x, sigma)`` and receives ``D(x, sigma)`` back, so the sampler can serve all solvers'
requests with one network call. A step returns ``(x_next, x_start)``: ``x_start`` is the point the
step really started from (UniPC's corrector moves it), and is what the history keeps for UniC;
iPNDM's eps = (x - D) / sigma are kept at the points where D was evaluated.

The ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al., 2022, eq. 4 with s = 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

HISTORY = 3  # past estimates kept: enough for UniC-2 and iPNDM's fourth order


@dataclass
class History:
    """Per-sample memory of past steps (newest first), independent of which solver made them."""

    denoised: torch.Tensor  # [B, HISTORY, *shape]
    eps: torch.Tensor  # [B, HISTORY, *shape] (x - denoised) / sigma at the evaluation point x
    sigma: torch.Tensor  # [B, HISTORY] float64, 0 for an empty slot
    x_start: torch.Tensor  # [B, *shape] where the previous step started
    ode_run: torch.Tensor  # [B] long: newest slots whose steps followed the ODE (no noise injected)

    @classmethod
    def empty(cls, batch: int, shape: tuple[int, ...], dtype: torch.dtype, device=None) -> History:
        return cls(
            torch.zeros(batch, HISTORY, *shape, dtype=dtype, device=device),
            torch.zeros(batch, HISTORY, *shape, dtype=dtype, device=device),
            torch.zeros(batch, HISTORY, dtype=torch.float64),  # bookkeeping stays on the CPU
            torch.zeros(batch, *shape, dtype=dtype, device=device),
            torch.zeros(batch, dtype=torch.long),
        )

    @property
    def count(self) -> torch.Tensor:
        return (self.sigma > 0).sum(1)

    @property
    def ode(self) -> torch.Tensor:
        """The previous step followed the ODE."""
        return self.ode_run > 0

    def __getitem__(self, rows) -> History:
        return History(
            self.denoised[rows],
            self.eps[rows],
            self.sigma[rows],
            self.x_start[rows],
            self.ode_run[rows],
        )

    def push(self, rows, x, x_start, sigma, denoised, ode) -> None:
        """Records D(x, sigma) evaluated at x, and the step from x_start it led to."""
        eps = (x - denoised) / _b(sigma, x)
        self.denoised[rows] = torch.cat([denoised[:, None], self.denoised[rows, :-1]], dim=1)
        self.eps[rows] = torch.cat([eps[:, None], self.eps[rows, :-1]], dim=1)
        self.sigma[rows] = torch.cat([sigma[:, None], self.sigma[rows, :-1]], dim=1)
        self.x_start[rows] = x_start
        self.ode_run[rows] = torch.where(ode, (self.ode_run[rows] + 1).clamp_max(HISTORY), 0)


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar [B], shaped to broadcast against ``like`` [B, ...] (on its device)."""
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def euler(x, sigma, sigma_next, denoised, history, eta, noise):
    """Euler step on the probability-flow ODE; in these coordinates it is DDIM (Song et al., 2021)."""
    d = (x - denoised) / _b(sigma, x)
    return x + _b(sigma_next - sigma, x) * d, x


def heun(x, sigma, sigma_next, denoised, history, eta, noise):
    """Algorithm 1 of Karras et al. (2022): Euler, then the trapezoidal correction unless sigma_next = 0."""
    d = (x - denoised) / _b(sigma, x)
    dt = _b(sigma_next - sigma, x)
    x_next = x + dt * d  # Euler step.
    second = sigma_next > 0
    if second.any():  # Apply 2nd order correction.
        denoised_2 = yield second, x_next[second], sigma_next[second]
        d_2 = (x_next[second] - denoised_2) / _b(sigma_next[second], denoised_2)
        x_next[second] = x[second] + dt[second] * (d[second] + d_2) / 2
    return x_next, x


def dpmpp_2m(x, sigma, sigma_next, denoised, history, eta, noise):
    """DPM-Solver++(2M), Lu et al. (2022) Algorithm 2: first order without history or to sigma = 0."""
    return multistep_predict(x, sigma, sigma_next, denoised, history), x


def unipc(x, sigma, sigma_next, denoised, history, eta, noise):
    """UniPC-2 with B(h) = e^h - 1 (Zhao et al., 2023): UniC corrects x with the new estimate, then
    UniP-2 predicts (for order 2, UniP's update equals DPM-Solver++(2M)'s)."""
    x_c = unic_correct(x, sigma, denoised, history)
    return multistep_predict(x_c, sigma, sigma_next, denoised, history), x_c


def euler_ancestral(x, sigma, sigma_next, denoised, history, eta, noise):
    """Euler ancestral step with a per-sample noise amount eta in [0, 1] (k-diffusion's
    ``get_ancestral_step``): eta = 0 is the ODE, eta = 1 DDPM-like ancestral sampling."""
    s, s_next = sigma, sigma_next
    sigma_up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2).sqrt())
    sigma_down = (s_next**2 - sigma_up**2).clamp_min(0).sqrt()
    d = (x - denoised) / _b(s, x)
    x_next = x + d * _b(sigma_down - s, x)
    if noise is not None:
        x_next = x_next + noise * _b(sigma_up, x)
    return x_next, x


def ipndm(x, sigma, sigma_next, denoised, history, eta, noise):
    """iPNDM (Zhang & Chen, 2023, DEIS sec. 4.2) in its variable-step form (diff-sampler's iPNDM_v):
    Adams-Bashforth on eps = (x - D) / sigma in sigma over this and up to three past ODE estimates,
    warm-starting at orders 1, 2, 3; to sigma = 0 it returns D (the final jump)."""
    eps = (x - denoised) / _b(sigma, x)
    nodes = torch.cat([sigma[:, None], history.sigma], dim=1)  # [B, j]
    used = torch.arange(HISTORY + 1) <= history.ode_run[:, None]
    pair = used[:, :, None] & used[:, None, :] & ~torch.eye(HISTORY + 1, dtype=torch.bool)
    gap = (nodes[:, :, None] - nodes[:, None, :]).where(pair, 1)  # [B, j, m] node_j - node_m
    # c_j = integral of the Lagrange basis L_j over [sigma, sigma_next]: degree <= 3, so the
    # two-point Gauss-Legendre rule is exact
    half = (sigma_next - sigma) / 2
    gauss = torch.tensor([-1.0, 1.0], dtype=torch.float64) / 3**0.5
    s = ((sigma + sigma_next) / 2)[:, None] + half[:, None] * gauss  # [B, q]
    factor = (s[:, None, None, :] - nodes[:, None, :, None]) / gap[..., None]  # [B, j, m, q]
    basis = factor.where(pair[..., None], 1).prod(2)  # [B, j, q] L_j(s_q)
    coef = (half[:, None] * basis.sum(2)).where(used, 0)
    weight = coef.to(x.device, x.dtype).view(*coef.shape, *([1] * (x.dim() - 1)))
    x_next = x + (weight * torch.cat([eps[:, None], history.eps], dim=1)).sum(1)
    return torch.where(_b(sigma_next > 0, x).bool(), x_next, denoised), x


def multistep_predict(x, sigma, sigma_next, denoised, history):
    """x_next = (sigma'/sigma) x + (1 - sigma'/sigma) D, with D extrapolated to second order from
    the previous estimate: D = m0 + (m0 - m1) / (2 r), r = h_last / h, h = log(sigma / sigma')."""
    second = (history.count > 0) & (sigma_next > 0)
    h = (sigma / sigma_next).log()
    h_last = (history.sigma[:, 0] / sigma).log()
    coef = torch.where(second, 1 / (2 * h_last / h), torch.zeros_like(h))
    d_eff = denoised + _b(coef, x) * (denoised - history.denoised[:, 0])
    ratio = sigma_next / sigma
    return _b(ratio, x) * x + _b(1 - ratio, x) * d_eff


def unic_correct(x, sigma, denoised, history):
    """UniC (B(h) = e^h - 1 variant) for the step history.sigma[0] -> sigma, redone from its start
    x_start with the estimate ``denoised`` at its end; order 2 when two past estimates exist.
    Only after ODE steps (an injected noise breaks the step it would redo)."""
    s0, s1 = history.sigma[:, 0], history.sigma[:, 1]
    valid = history.ode & (s0 > 0)
    if not valid.any():
        return x
    h = torch.where(valid, (s0 / sigma).log(), torch.ones_like(sigma))
    b_h = torch.expm1(-h)  # = h phi_1(-h), the B(h) of bh2
    phi = b_h / -h - 1  # h phi_2-like term before scaling
    b1 = phi / b_h
    b2 = (phi / -h - 0.5) * 2 / b_h
    r1 = torch.where(s1 > 0, (s0 / s1).log() / h, -torch.ones_like(h))
    rho0 = (b1 - b2) / (1 - r1)
    rho1 = b1 - rho0
    order2 = s1 > 0
    rho_d1 = torch.where(order2, rho0, torch.zeros_like(rho0))
    rho_t = torch.where(order2, rho1, torch.full_like(rho1, 0.5))
    m0, m1 = history.denoised[:, 0], history.denoised[:, 1]
    d1 = (m1 - m0) / _b(r1, x)
    x_first = _b(sigma / s0.where(valid, sigma), x) * history.x_start - _b(b_h, x) * m0
    x_c = x_first - _b(b_h, x) * (_b(rho_d1, x) * d1 + _b(rho_t, x) * (denoised - m0))
    return torch.where(_b(valid, x).bool(), x_c, x)


@dataclass(frozen=True)
class Expert:
    """A registered solver: its step and what the sampler must know about it."""

    name: str
    step: Callable
    extra_nfe: int = 0  # evaluations beyond the shared one, when sigma_next > 0
    stochastic: bool = False  # takes a noise amount eta and fresh noise


EXPERTS: tuple[Expert, ...] = (
    Expert("euler", euler),
    Expert("dpmpp-2m", dpmpp_2m),
    Expert("unipc", unipc),
    Expert("heun", heun, extra_nfe=1),
    Expert("euler-ancestral", euler_ancestral, stochastic=True),
    Expert("ipndm", ipndm),
)
EXPERT_NAMES: tuple[str, ...] = tuple(e.name for e in EXPERTS)


def expert_index(name: str) -> int:
    if name not in EXPERT_NAMES:
        raise ValueError(f"unknown solver {name!r}; choose from {list(EXPERT_NAMES)}")
    return EXPERT_NAMES.index(name)


def steps_for_budget(name: str, budget: int) -> int:
    """Most steps of a fixed schedule whose NFE fits the budget (Heun's last step is Euler)."""
    extra = EXPERTS[expert_index(name)].extra_nfe
    return max(1, (budget + extra) // (1 + extra))
