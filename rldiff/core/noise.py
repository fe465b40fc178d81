"""The noise-level map of a discrete DDPM model: timestep t <-> EDM sigma.

A DDPM model trained on ``alphas_cumprod`` sees ``x_vp = sqrt(a) x0 + sqrt(1 - a) eps``; dividing by
``sqrt(a)`` gives the EDM / k-diffusion form ``x = x0 + sigma eps`` with ``sigma = sqrt((1 - a) / a)``.
Fractional timesteps interpolate log sigma linearly, as k-diffusion's ``DiscreteSchedule`` does.

The table is the one the model was trained with: ``alphas_cumprod`` exactly as diffusers'
``DDPMScheduler`` computes it from the scheduler config (betas and their cumulative product in
float32, the cosine ``alpha_bar`` in Python floats), then sigma in float64 from those float32 values.
The beta-schedule functions below each reproduce one diffusers schedule, operation for operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
# The start rule's default per schedule (see ``DiscreteVP``): diffusers' documented value for the
# clipped cosine schedule; no clipping for the others.
DEFAULT_LAMBDA_MIN_CLIPPED = {"squaredcos_cap_v2": -5.1}
ZERO_SNR_ALPHA_BAR = 2.0**-24  # the last alpha_bar of a zero-terminal-SNR table (DPM-Solver's)


def linear_betas(beta_start: float, beta_end: float, n: int) -> torch.Tensor:
    """DDPM's linear betas (Ho et al., 2020): diffusers' ``linear``."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)


def scaled_linear_betas(beta_start: float, beta_end: float, n: int) -> torch.Tensor:
    """Latent Diffusion's betas, linear in sqrt(beta) (Rombach et al., 2022): ``scaled_linear``."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2


def sigmoid_betas(beta_start: float, beta_end: float, n: int) -> torch.Tensor:
    """GeoDiff's sigmoid betas (Xu et al., 2022): diffusers' ``sigmoid``."""
    betas = torch.linspace(-6, 6, n, dtype=torch.float32)
    return torch.sigmoid(betas) * (beta_end - beta_start) + beta_start


def cosine_alpha_bar(t: float) -> float:
    """Improved DDPM's cosine alpha_bar (Nichol & Dhariwal, 2021): ``squaredcos_cap_v2``."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def laplace_alpha_bar(t: float) -> float:
    """diffusers' ``laplace`` alpha_bar, as diffusers writes it (a square root included)."""
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def betas_for_alpha_bar(
    n: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """diffusers' ``betas_for_alpha_bar``: 1 - alpha_bar(t2) / alpha_bar(t1), capped at max_beta."""
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Lin et al. (2024), diffusers' ``rescale_zero_terminal_snr``: SNR 0 at t = T."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def ddpm_betas(config: dict) -> torch.Tensor:
    """diffusers' ``DDPMScheduler.__init__`` betas for a scheduler config (float32)."""
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    schedule = config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    n = int(config.get("num_train_timesteps", 1000))
    if schedule == "linear":
        return linear_betas(start, end, n)
    if schedule == "scaled_linear":
        return scaled_linear_betas(start, end, n)
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, cosine_alpha_bar)
    if schedule == "laplace":
        return betas_for_alpha_bar(n, laplace_alpha_bar)
    if schedule == "sigmoid":
        return sigmoid_betas(start, end, n)
    raise ValueError(
        f"unsupported beta_schedule {schedule!r}: supported are {', '.join(BETA_SCHEDULES)}, "
        "or a trained_betas list"
    )


def ddpm_alphas_cumprod(config: dict) -> torch.Tensor:
    """``alphas_cumprod`` (float32) as diffusers computes it; a zero-terminal-SNR table ends at
    2^-24 instead of 0, as ``DPMSolverMultistepScheduler`` sets it, so its last sigma is finite."""
    betas = ddpm_betas(config)
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if config.get("rescale_betas_zero_snr"):
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
    return alphas_cumprod


def clipped_start_index(alphas_cumprod: torch.Tensor, lambda_min_clipped: float | None) -> int:
    """The highest timestep whose log-SNR half ``lambda = log(alpha) - log(sigma_vp)`` is at least
    ``lambda_min_clipped``: ``DPMSolverMultistepScheduler.set_timesteps``'s first timestep (its
    ``last_timestep - 1``), computed the same way (float32). None: the last timestep."""
    n = len(alphas_cumprod)
    if lambda_min_clipped is None:
        return n - 1
    lambda_t = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    clipped = int(torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped))
    if clipped >= n:
        raise ValueError(
            f"lambda_min_clipped {lambda_min_clipped} clips every timestep (the largest log-SNR "
            f"half of the table is {float(lambda_t.max()):.3g})"
        )
    return n - clipped - 1


@dataclass(frozen=True)
class DiscreteVP:
    """Sigma table of a discrete variance-preserving model (index = training timestep), and the
    timestep sampling starts at.

    ``sigma_to_t`` / ``t_to_sigma`` cover the whole trained table; ``sigma_max`` is the *start*
    level, ``sigmas[start_index]``, where every sampler, schedule and feature begins. The start rule
    is the one the model's own scheduler family uses: ``DPMSolverMultistepScheduler``'s
    ``lambda_min_clipped`` (``set_timesteps`` drops the top timesteps whose
    ``lambda = -log(sigma)`` falls below it; diffusers documents it as critical for the cosine
    schedule and uses -5.1 there). The clipped cosine table (max_beta 0.999) jumps from sigma
    about 640 to about 20,300 at its last timestep, and a first solver step from there amplifies
    errors by orders of magnitude; -5.1 starts it at t = 995 (sigma 160.4) instead. A scheduler
    config's own ``lambda_min_clipped`` is honoured; otherwise -5.1 for ``squaredcos_cap_v2`` and no
    clipping (the last timestep) for every other schedule.

    ``config`` holds what defines the table, as given (JSON values, never computed floats): the
    scheduler-config entries and the start rule (``lambda_min_clipped``, None for no clipping);
    for a table given directly, the table itself and its start index.
    """

    sigmas: torch.Tensor  # [T], float64, increasing with t
    start_index: int | None = None  # timestep sampling starts at; None: the last one
    config: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = len(self.sigmas)
        start = n - 1 if self.start_index is None else int(self.start_index)
        if not 0 <= start < n:
            raise ValueError(f"start_index {self.start_index} outside the table's 0..{n - 1}")
        object.__setattr__(self, "start_index", start)
        if not self.config:
            defined = {"sigmas": self.sigmas.tolist(), "start_index": start}
            object.__setattr__(self, "config", defined)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> DiscreteVP:
        """The table of a diffusers scheduler config (``scheduler_config.json``), exactly as
        ``DDPMScheduler`` computes ``alphas_cumprod``, and its start level (see the class)."""
        schedule = config.get("beta_schedule", "linear")
        defined = {
            "beta_schedule": schedule,
            "beta_start": config.get("beta_start", 0.0001),
            "beta_end": config.get("beta_end", 0.02),
            "num_train_timesteps": config.get("num_train_timesteps", 1000),
        }
        if config.get("trained_betas") is not None:
            defined["trained_betas"] = list(config["trained_betas"])
        if config.get("rescale_betas_zero_snr"):
            defined["rescale_betas_zero_snr"] = True
        clip = config.get("lambda_min_clipped", DEFAULT_LAMBDA_MIN_CLIPPED.get(schedule))
        defined["lambda_min_clipped"] = None if clip is None or clip == -math.inf else clip
        alphas_cumprod = ddpm_alphas_cumprod(defined)
        if len(alphas_cumprod) < 2:
            raise ValueError(f"a noise table needs at least 2 timesteps, got {len(alphas_cumprod)}")
        a = alphas_cumprod.to(torch.float64)
        sigmas = ((1 - a) / a).sqrt()
        if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas.diff() > 0).all()):
            raise ValueError(
                "the scheduler config gives no usable noise table (alphas_cumprod must fall "
                "strictly inside (0, 1))"
            )
        start = clipped_start_index(alphas_cumprod, defined["lambda_min_clipped"])
        return cls(sigmas, start, defined)

    @classmethod
    def linear_betas(
        cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000
    ) -> DiscreteVP:
        """DDPM's linear beta schedule (Ho et al., 2020), as diffusers computes it."""
        return cls.from_scheduler_config(
            {
                "beta_schedule": "linear",
                "beta_start": beta_start,
                "beta_end": beta_end,
                "num_train_timesteps": num_train_timesteps,
            }
        )

    @classmethod
    def from_betas(cls, betas) -> DiscreteVP:
        """A table from given betas (diffusers' ``trained_betas``, computed the same way)."""
        betas = torch.as_tensor(betas).reshape(-1).tolist()
        return cls.from_scheduler_config(
            {"trained_betas": betas, "num_train_timesteps": len(betas)}
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def t_start(self) -> int:
        """The timestep sampling starts at (``start_index``)."""
        return self.start_index

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The start level: the sigma every sampler and schedule begins at."""
        return float(self.sigmas[self.start_index])

    @property
    def sigma_trained_max(self) -> float:
        """The table's last (largest) sigma; above ``sigma_max`` when the start is clipped."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for each sigma (clamped to the trained range), computed on
        ``sigma``'s device (the table is copied there once)."""
        log_sigmas = self._log_sigmas(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(self.sigma_min, self.sigma_trained_max).log()
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return (low + w.clamp(0, 1)).to(sigma.dtype)

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_log_sigmas_on", {})  # a cache, not a field
        if device not in cache:
            cache[device] = self.sigmas.log().to(device)
        return cache[device]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_log_sigmas_on"}

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timestep t."""
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_sigma = (1 - w) * self.sigmas[low].log() + w * self.sigmas[high].log()
        return log_sigma.exp()
