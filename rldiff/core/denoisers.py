"""Denoisers ``D(x, sigma, cond) -> x0_hat`` in the EDM parameterisation ``x = x0 + sigma * eps``.

``sigma`` is a per-sample tensor ``[B]``: one call serves a batch whose samples sit at different noise
levels. Classifier-free guidance takes a scale per sample (Ho & Salimans, 2022):
``x0 = x0_uncond + w * (x0_cond - x0_uncond)``; ``w = 1`` is plain conditional sampling and needs no
unconditional pass. One call is one network evaluation (NFE), whatever the guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rldiff.core.noise import DiscreteVP

DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "assets" / "digits-unet"
UNCONDITIONAL = -1  # label meaning "no class": the model's null class, or the whole mixture


def labels_for_seeds(seeds, num_classes: int) -> list[int]:
    """The class label of each seed: ``seed % num_classes``, or ``UNCONDITIONAL`` for every seed
    of a model without classes (``num_classes`` 0). One rule for references, training and
    benchmarks, so a seed means the same sample everywhere."""
    seeds = [int(s) for s in seeds]
    if num_classes <= 0:
        return [UNCONDITIONAL] * len(seeds)
    return [s % num_classes for s in seeds]


def guidance_for_seeds(seeds, mix) -> list[float]:
    """The guidance scale of each seed in a condition mix: ``mix[(seed + seed // 10) % len(mix)]``.
    Ten consecutive seeds from a multiple of ten cycle through the scales (for up to ten of them),
    and the scale shifts by one every ten seeds, so each class (``seed % 10``) meets every scale
    (``seed % len(mix)`` alone would tie even classes to half the scales); one float: every seed."""
    mix = [float(g) for g in (mix if isinstance(mix, list | tuple) else [mix])]
    return [mix[(int(s) + int(s) // 10) % len(mix)] for s in seeds]


@dataclass(frozen=True)
class Condition:
    """Per-sample conditioning: class label (``UNCONDITIONAL`` for none) and guidance scale."""

    labels: torch.Tensor  # [B] int64
    guidance: torch.Tensor  # [B] float

    @classmethod
    def make(cls, labels, guidance=1.0, batch: int | None = None) -> Condition:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if batch is not None and labels.numel() == 1:
            labels = labels.expand(batch)
        guidance = torch.as_tensor(guidance, dtype=torch.float64).reshape(-1)
        if guidance.numel() == 1:
            guidance = guidance.expand(len(labels))
        if len(guidance) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(guidance)} guidance scales")
        return cls(labels.clone(), guidance.clone())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> Condition:
        return Condition(self.labels[index], self.guidance[index])


class Denoiser(Protocol):
    """The contract every model is adapted to."""

    noise_table: DiscreteVP  # the noise-level range and the t <-> sigma map
    num_classes: int  # class labels 0..num_classes - 1; 0: unconditional only

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor: ...


def guided(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in x0 space (equivalent to epsilon space: the map is affine)."""
    w = w.to(x0_cond.dtype).view(-1, *([1] * (x0_cond.dim() - 1)))
    return x0_uncond + w * (x0_cond - x0_uncond)


def set_tf32(enabled: bool) -> None:
    """TF32 for this process's CUDA convolutions and matrix products. cuDNN convolutions use it by
    default, and on a 6-NFE Heun solve it moved samples by up to 0.35 from the CPU result (UniPC:
    1.2e-3); with it off, 2.1e-3 and 7.8e-6. Numbers that are reported, cached or learned from
    need it off."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


class DiffusersDenoiser:
    """Adapts a diffusers ``UNet2DModel`` trained as a DDPM (epsilon, v or sample prediction).

    On a GPU every call runs with TF32 off (``set_tf32``) unless ``allow_tf32`` is set: only the
    service may set it, as a documented option, since its samples are not compared or learned from.
    """

    allow_tf32: bool = False

    def __init__(self, unet, noise_table: DiscreteVP, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.unet = unet.eval().requires_grad_(False)
        self.noise_table = noise_table
        self.prediction_type = prediction_type
        num_embeds = getattr(unet.config, "num_class_embeds", None)
        self.null_class = None if num_embeds is None else num_embeds - 1  # the last: no class
        self.num_classes = 0 if self.null_class is None else self.null_class
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, height, width)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> DiffusersDenoiser:
        self.unet.to(device)
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        labels, w, sigma = cond.labels.to(x.device), cond.guidance.to(x.device), sigma.to(x.device)
        if self.null_class is None:
            return self._x0(x, sigma, None)
        labels = torch.where(labels == UNCONDITIONAL, self.null_class, labels)
        extra = (w != 1) & (labels != self.null_class)  # these also need the unconditional pass
        if not extra.any():
            return self._x0(x, sigma, labels)
        both = self._x0(
            torch.cat([x, x[extra]]),
            torch.cat([sigma, sigma[extra]]),
            torch.cat([labels, torch.full_like(labels[extra], self.null_class)]),
        )
        x0, x0_uncond = both[: len(x)], both[len(x) :]
        x0[extra] = guided(x0[extra], x0_uncond, w[extra])
        return x0

    @torch.no_grad()
    def _x0(
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        if x.is_cuda:  # per call: the flags are process-wide, and any library may change them
            set_tf32(self.allow_tf32)
        s = sigma.to(x.device, x.dtype).view(-1, 1, 1, 1)
        c_in = 1 / (s**2 + 1).sqrt()  # EDM x -> the VP input the network was trained on
        t = self.noise_table.sigma_to_t(sigma.to(x.device, torch.float64)).float()  # no host trip
        dtype = next(self.unet.parameters()).dtype
        out = self.unet((x * c_in).to(dtype), t, class_labels=labels).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":  # v = alpha eps - sigma_vp x0 (Salimans & Ho)
            return c_in**2 * x - s * c_in * out  # x0 = alpha x_vp - sigma_vp v, in EDM terms
        return out


def load_denoiser(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Loads a diffusers UNet2DModel from a local ``save_pretrained`` directory (never a hub id).

    Accepts a model directory (``config.json`` + safetensors, ``scheduler_config.json`` beside it) or
    a pipeline directory with ``unet/`` and ``scheduler/`` subfolders. Weights only as safetensors.
    The noise table and its start level come from the scheduler config
    (``DiscreteVP.from_scheduler_config``).
    """
    from diffusers import UNet2DModel

    root = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist (run `rldiff pretrain`?)")
    unet_dir = root / "unet" if (root / "unet" / "config.json").exists() else root
    schedulers = [root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json"]
    if not (unet_dir / "config.json").is_file() or not any(p.is_file() for p in schedulers):
        raise FileNotFoundError(
            f"{root} is not a diffusers model directory: expected config.json, .safetensors "
            "weights and scheduler_config.json (or unet/ and scheduler/ subfolders), as "
            "save_pretrained writes them"
        )
    scheduler_file = _first_existing(schedulers)
    if not any(unet_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no .safetensors weights in {unet_dir}: only safetensors load")
    scheduler = json.loads(scheduler_file.read_text())
    noise = DiscreteVP.from_scheduler_config(scheduler)  # a bad config fails before the weights
    unet = UNet2DModel.from_pretrained(
        unet_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
    )
    return DiffusersDenoiser(
        unet.to(device),
        noise,
        scheduler.get("prediction_type", "epsilon"),
    )


def _first_existing(paths: list[Path]) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise FileNotFoundError(f"none of {[str(p) for p in paths]} exists")
