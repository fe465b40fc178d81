"""An exact denoiser: a Gaussian mixture whose posterior mean E[x0 | x0 + sigma eps] is closed form.

For ``p(x0) = sum_k pi_k N(mu_k, S_k)`` and ``x = x0 + sigma eps`` (Bishop, 2006, sec. 2.3.3):
``E[x0 | x] = sum_k w_k(x) (mu_k + S_k (S_k + sigma^2 I)^-1 (x - mu_k))`` with
``w_k ∝ pi_k N(x; mu_k, S_k + sigma^2 I)``. Computed in each component's eigenbasis, so a batch at
per-sample sigmas costs two matrix products. A class label selects its component exactly.
"""

from __future__ import annotations

import math

import torch

from rldiff.core.denoisers import UNCONDITIONAL, Condition, guided
from rldiff.core.fingerprint import Digest
from rldiff.core.noise import DiscreteVP


class GaussianMixtureDenoiser:
    """Exact denoiser of a Gaussian mixture (one component per class)."""

    def __init__(
        self,
        means: torch.Tensor,
        covariances: torch.Tensor,
        weights: torch.Tensor | None = None,
        sample_shape: tuple[int, ...] | None = None,
        noise_table: DiscreteVP | None = None,
        dtype: torch.dtype = torch.float64,
        definition: Digest | None = None,
    ):
        """``definition``: what the parameters were computed from (``fit`` passes its data);
        by default the parameters as given. Either way the fingerprint hashes inputs, never the
        eigen decomposition, whose last bits depend on the CPU kernels."""
        k, d = means.shape
        weights = torch.full((k,), 1 / k) if weights is None else weights
        if definition is None:
            definition = Digest("gmm").tensor("means", means).tensor("covariances", covariances)
            definition.tensor("weights", weights)
        self.noise_table = noise_table or DiscreteVP.linear_betas()
        definition.json("dtype", str(dtype)).json("noise", self.noise_table.config)
        self._fingerprint = definition.hexdigest()
        self.means = means.to(dtype)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(covariances.to(torch.float64))
        self.eigenvalues = self.eigenvalues.clamp_min(0).to(dtype)  # [K, d]
        self.eigenvectors = self.eigenvectors.to(dtype)  # [K, d, d]
        self.log_weights = (weights / weights.sum()).log().to(dtype)
        self.sample_shape = sample_shape or (d,)

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4, **kwargs):
        """One Gaussian per class, fitted to data (a small ridge keeps covariances definite)."""
        x = images.reshape(len(images), -1).to(torch.float64)
        classes = labels.unique(sorted=True)
        means, covs, counts = [], [], []
        for c in classes:
            xc = x[labels == c]
            means.append(xc.mean(0))
            covs.append(torch.cov(xc.T) + ridge * torch.eye(x.shape[1], dtype=torch.float64))
            counts.append(len(xc))
        definition = Digest("gmm-fit").tensor("images", images).tensor("labels", labels)
        return cls(
            torch.stack(means),
            torch.stack(covs),
            torch.tensor(counts, dtype=torch.float64),
            sample_shape=tuple(images.shape[1:]),
            definition=definition.json("ridge", ridge),
            **kwargs,
        )

    def fingerprint(self) -> str:
        """The model's identity, from its inputs (see ``rldiff.core.fingerprint``)."""
        return self._fingerprint

    @property
    def num_classes(self) -> int:
        """Class labels are the mixture's components, 0..K-1."""
        return int(self.means.shape[0])

    def sample_data(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exact draws of x0 from the given components (for distribution checks)."""
        z = torch.randn(
            len(labels), self.means.shape[1], generator=generator, dtype=self.means.dtype
        )
        scaled = self.eigenvalues[labels].sqrt() * z
        x = self.means[labels] + torch.einsum("bij,bj->bi", self.eigenvectors[labels], scaled)
        return x.reshape(len(labels), *self.sample_shape)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        labels = cond.labels.to(x.device)
        w = cond.guidance.to(x.device)
        x0_uncond = self._posterior_mean(x, sigma, None)
        conditional = labels != UNCONDITIONAL
        if not conditional.any():
            return x0_uncond
        x0 = x0_uncond.clone()
        x0_cond = self._posterior_mean(x[conditional], sigma[conditional], labels[conditional])
        x0[conditional] = guided(x0_cond, x0_uncond[conditional], w[conditional])
        return x0

    def _posterior_mean(self, x, sigma, labels):
        b = len(x)
        flat = x.reshape(b, -1).to(self.means.dtype)
        s2 = sigma.to(self.means.dtype).view(b, 1, 1) ** 2
        if labels is not None:  # each sample's own component, grouped so each group is one product
            out = torch.empty_like(flat)
            for k in labels.unique().tolist():
                rows = labels == k
                mean, _ = self._component_means(flat[rows], s2[rows], [k])
                out[rows] = mean[:, 0]
            return out.reshape(x.shape).to(x.dtype)
        mean, log_p = self._component_means(flat, s2, list(range(len(self.means))))
        resp = torch.softmax(log_p + self.log_weights, dim=1)  # [B, K]
        return torch.einsum("bk,bki->bi", resp, mean).reshape(x.shape).to(x.dtype)

    def _component_means(self, flat, s2, components):
        """Posterior means [B, K, d] and log N(x; mu_k, S_k + sigma^2 I) [B, K] for some components."""
        mu, lam, u = (
            self.means[components],
            self.eigenvalues[components],
            self.eigenvectors[components],
        )
        y = torch.einsum("bkj,kji->bki", flat[:, None] - mu, u)  # coordinates in the eigenbasis
        mean = mu + torch.einsum("bki,kji->bkj", lam / (lam + s2) * y, u)
        log_p = -0.5 * ((y**2 / (lam + s2)).sum(-1) + (lam + s2).log().sum(-1))
        return mean, log_p - 0.5 * y.shape[-1] * math.log(2 * math.pi)
