"""The noise-level map of a discrete DDPM model: timestep t <-> EDM sigma.

A DDPM model trained on ``alphas_cumprod`` sees ``x_vp = sqrt(a) x0 + sqrt(1 - a) eps``; dividing by
``sqrt(a)`` gives the EDM / k-diffusion form ``x = x0 + sigma eps`` with ``sigma = sqrt((1 - a) / a)``.
Fractional timesteps interpolate log sigma linearly, as k-diffusion's ``DiscreteSchedule`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiscreteVP:
    """Sigma table of a discrete variance-preserving model (index = training timestep)."""

    sigmas: torch.Tensor  # [T], float64, increasing with t

    @classmethod
    def linear_betas(
        cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000
    ) -> DiscreteVP:
        """DDPM's linear beta schedule (Ho et al., 2020)."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls.from_betas(betas)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> DiscreteVP:
        alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
        return cls(((1 - alphas_cumprod) / alphas_cumprod).sqrt())

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for each sigma (clamped to the trained range)."""
        log_sigmas = self.sigmas.log()
        log_sigma = sigma.to(torch.float64).clamp(self.sigma_min, self.sigma_max).log()
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return (low + w.clamp(0, 1)).to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timestep t."""
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_sigma = (1 - w) * self.sigmas[low].log() + w * self.sigmas[high].log()
        return log_sigma.exp()
