"""Resolves a model name to a denoiser: the embedded UNet, the exact digits mixture, or a path."""

from __future__ import annotations

from functools import lru_cache

import torch

from rldiff.config import EMBEDDED, EXACT_GMM


def visible_device() -> str:
    """``cuda`` when this process sees a GPU, else ``cpu``: where a driver prepares and evaluates,
    and where an env runner samples."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=4)
def load_model(spec: str = EMBEDDED, device: str = "cpu"):
    """``embedded``, ``gmm``, or a local diffusers ``save_pretrained`` directory."""
    if spec == EXACT_GMM:
        from rldiff.core.gmm import GaussianMixtureDenoiser
        from rldiff.data.digits import load_digits16

        images, labels = load_digits16("train")
        return GaussianMixtureDenoiser.fit(images, labels, dtype=torch.float32)
    from rldiff.core.denoisers import load_denoiser

    return load_denoiser(None if spec == EMBEDDED else spec, device=device)
