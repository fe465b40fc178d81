"""What identifies a model in cache keys: a hash of what *defines* it, the same on every machine.

A fingerprint covers the inputs that define a model: its weights as stored (the state dict's
values), its prediction type and the scheduler config its noise table is made from; for a fitted
Gaussian mixture, the data and settings it was fitted from. It never covers floats computed at
run time (the noise table, an eigen decomposition, a covariance): their last bits depend on the CPU
kernels torch picks (``ATEN_CPU_CAPABILITY``), the torch build and the library versions, and a key
built from them finds no shipped or cached file on another machine.
"""

from __future__ import annotations

import hashlib
import json

import torch


class Digest:
    """sha256 over named JSON values and tensors' exact bytes (dtype and shape included)."""

    def __init__(self, kind: str):
        self._h = hashlib.sha256(f"rldiff-model|{kind}|".encode())

    def json(self, name: str, value) -> Digest:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        self._h.update(f"{name}={text}|".encode())
        return self

    def tensor(self, name: str, tensor: torch.Tensor) -> Digest:
        t = tensor.detach().cpu().contiguous().reshape(-1)
        self._h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        self._h.update(t.view(torch.uint8).numpy().tobytes())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def model_fingerprint(denoiser) -> str:
    """The model's identity (64 hex digits). A ``DiffusersDenoiser`` (attribute ``.unet``) hashes
    its state dict, prediction type and noise config; any other model defines
    ``fingerprint() -> str`` from what defines it."""
    if hasattr(denoiser, "fingerprint"):
        return str(denoiser.fingerprint())
    if hasattr(denoiser, "unet"):
        digest = Digest("diffusers").json("prediction_type", denoiser.prediction_type)
        digest.json("noise", denoiser.noise_table.config)
        for name, tensor in sorted(denoiser.unet.state_dict().items()):
            digest.tensor(name, tensor)
        return digest.hexdigest()
    raise TypeError(
        f"cannot fingerprint {type(denoiser).__name__}: give it a fingerprint() -> str method"
    )
