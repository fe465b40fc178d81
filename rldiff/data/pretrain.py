"""Reproducible pretraining of the embedded default diffusion model and the metric network.

Contract: ``pretrain(cfg)`` trains a class-conditional DDPM UNet (``train_unet``) and a digit
classifier (``train_classifier``) on the ``"train"`` split of :mod:`rldiff.data.digits`, and writes
under ``cfg.out_dir``::

    digits-unet/        config.json, diffusion_pytorch_model.safetensors, scheduler_config.json
    digits-classifier/  config.json, model.safetensors
    MODEL_CARD.md       data, architecture, settings and measured results

``digits-unet/`` is a standard local diffusers layout (``UNet2DModel.from_pretrained`` and
``DDPMScheduler.from_pretrained`` read it). Class index ``NULL_CLASS`` (10) is the
unconditional label used for classifier-free guidance. Same config, same files: all
randomness comes from the seeds in :class:`PretrainConfig`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from tqdm import tqdm

from rldiff.config import add_flags, from_flags, setting
from rldiff.data.classifier import DigitClassifier, save_classifier
from rldiff.data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits16

ASSETS_DIR: Path = Path(__file__).parent.parent / "assets"
UNET_SUBDIR = "digits-unet"
CLASSIFIER_SUBDIR = "digits-classifier"
MODEL_CARD_NAME = "MODEL_CARD.md"
NULL_CLASS: int = NUM_CLASSES  # extra class embedding = "no label", for classifier-free guidance
FD_LINE = "Sample quality (FD at 50 NFE vs the real-data floor): see `rldiff evaluate` report"


@dataclass
class PretrainConfig:
    """All knobs of the pretraining job; the defaults produce the shipped assets."""

    # --- diffusion UNet ---
    iterations: int = setting(3000, "UNet optimiser steps")
    batch_size: int = setting(128, "UNet batch size")
    lr: float = setting(2e-3, "peak AdamW learning rate")
    warmup_iterations: int = setting(100, "linear LR warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "max global grad norm")
    ema_decay: float = setting(0.999, "EMA decay (EMA is shipped)")
    label_dropout: float = setting(0.1, "prob. a label is replaced by the NULL class (CFG)")
    seed: int = setting(0, "seed for UNet init, batches and noise")
    # --- metric classifier ---
    classifier_epochs: int = setting(12, "classifier training epochs")
    classifier_batch_size: int = setting(64, "classifier batch size")
    classifier_lr: float = setting(2e-3, "classifier Adam LR")
    classifier_max_shift: float = setting(1.5, "max random shift (pixels) for augmentation")
    classifier_seed: int = setting(0, "seed for the classifier")
    # --- job ---
    out_dir: Path = setting(ASSETS_DIR, "output directory", flag="--out")
    num_threads: int = setting(1, "torch CPU threads")


@dataclass
class UnetResult:
    """What ``train_unet`` measured and where it wrote the model."""

    path: Path
    num_params: int
    seconds: float
    final_loss: float  # mean training loss over the last ``_LOSS_WINDOW`` iterations


@dataclass
class ClassifierResult:
    """What ``train_classifier`` measured and where it wrote the model."""

    path: Path
    num_params: int
    seconds: float
    test_accuracy: float


_LOSS_WINDOW = 100  # single-batch diffusion losses are noisy; report a running mean


def build_unet() -> UNet2DModel:
    """The default ~0.8 M-parameter class-conditional UNet (10 digits + NULL class)."""
    return UNet2DModel(
        sample_size=IMAGE_SHAPE[1],
        in_channels=IMAGE_SHAPE[0],
        out_channels=IMAGE_SHAPE[0],
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=NUM_CLASSES + 1,
    )


def build_scheduler() -> DDPMScheduler:
    """The training noise schedule: DDPM, linear betas 1e-4 -> 0.02, 1000 steps, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``ema <- d * ema + (1 - d) * model`` with diffusers' warm-up ``d <= (1+t)/(10+t)``.

    The warm-up keeps the random initialisation from lingering in short runs.
    """
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - d)


def _drop_labels(labels: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Replace each label by ``NULL_CLASS`` with probability ``p`` (trains the CFG branch)."""
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def _unet_step(
    unet: UNet2DModel,
    sched: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Epsilon-prediction MSE on uniformly drawn timesteps."""
    noise = torch.randn(images.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (images.shape[0],), generator=gen)
    noisy = sched.add_noise(images, noise, t)
    return F.mse_loss(unet(noisy, t, class_labels=labels).sample, noise)


def train_unet(cfg: PretrainConfig) -> UnetResult:
    """Train the diffusion UNet on the train split; save the EMA weights + scheduler config."""
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits16("train")
    unet, sched = build_unet(), build_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_iterations, cfg.iterations)
    )
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.iterations), desc="unet", unit="it")
    for step in bar:
        # Sampling with replacement keeps the stream of batches a pure function of the seed.
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        y = _drop_labels(labels[idx], cfg.label_dropout, gen)
        loss = _unet_step(unet, sched, images[idx], y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema_update(ema, unet, cfg.ema_decay, step)
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.iterations - 1:
            bar.set_postfix(loss=f"{sum(losses[-_LOSS_WINDOW:]) / len(losses[-_LOSS_WINDOW:]):.4f}")
    seconds = time.perf_counter() - start
    out = Path(cfg.out_dir) / UNET_SUBDIR
    ema.save_pretrained(out, safe_serialization=True)
    sched.save_config(out)
    window = losses[-_LOSS_WINDOW:] or [float("nan")]
    return UnetResult(out, count_params(ema), seconds, sum(window) / len(window))


def random_shift(x: torch.Tensor, max_shift: float, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels; uncovered pixels become background.

    Background is -1, so shift ``x + 1`` (whose background is 0 = grid_sample's zero padding).
    """
    b, _, h, w = x.shape
    pixels = torch.tensor([w, h], dtype=x.dtype) / 2.0  # normalised coords span 2 per side
    offset = (torch.rand(b, 2, generator=gen) * 2 - 1) * max_shift / pixels
    theta = torch.zeros(b, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = offset
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", align_corners=False) - 1


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``images``."""
    model.eval()
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def _classifier_epoch(
    model: DigitClassifier,
    opt: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    cfg: PretrainConfig,
    gen: torch.Generator,
) -> None:
    """One shuffled pass over ``data`` with random-shift augmentation."""
    images, labels = data
    model.train()
    for idx in torch.randperm(images.shape[0], generator=gen).split(cfg.classifier_batch_size):
        x = random_shift(images[idx], cfg.classifier_max_shift, gen)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_classifier(cfg: PretrainConfig) -> ClassifierResult:
    """Train the metric classifier on the train split, measure test accuracy, save it."""
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.classifier_seed)
    gen = torch.Generator().manual_seed(cfg.classifier_seed)
    train, test = load_digits16("train"), load_digits16("test")
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.classifier_lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.classifier_epochs)
    start = time.perf_counter()
    for _ in tqdm(range(cfg.classifier_epochs), desc="classifier", unit="epoch"):
        _classifier_epoch(model, opt, train, cfg, gen)
        lr_sched.step()
    seconds = time.perf_counter() - start
    acc = accuracy(model, *test)
    info = {"test_accuracy": round(acc, 4), "train_seconds": round(seconds, 1)}
    out = save_classifier(model, Path(cfg.out_dir) / CLASSIFIER_SUBDIR, extra=info)
    return ClassifierResult(out, count_params(model), seconds, acc)


def _file_size(path: Path) -> str:
    """Human-readable size of ``path``."""
    return f"{path.stat().st_size / 2**20:.2f} MiB"


def model_card(cfg: PretrainConfig, unet: UnetResult, clf: ClassifierResult) -> str:
    """Markdown model card describing data, architectures, settings and measured results."""
    unet_file = unet.path / "diffusion_pytorch_model.safetensors"
    clf_file = clf.path / "model.safetensors"
    settings = "\n".join(
        f"| `{f.name}` | `{getattr(cfg, f.name)}` | {f.metadata.get('help', '')} |"
        for f in dataclasses.fields(cfg)
        if f.name != "out_dir"
    )
    return f"""# rldiff embedded models

Produced by `python jobs/pretrain.py` (equivalently `rldiff pretrain`); same settings, same files.

## Data
scikit-learn's bundled digits (1797 8x8 images, 10 classes), bilinearly upsampled to 16x16 and
scaled to [-1, 1]. Fixed stratified 80/20 split (seed 0): 1437 train / 360 test images.
Both models see the train split only; no flips (digits are not mirror-symmetric).

## Diffusion model (`{UNET_SUBDIR}/`, {_file_size(unet_file)})
- `diffusers.UNet2DModel`, 16x16x1, blocks (32, 32, 64), 1 layer per block, attention at the
  4x4 level, GroupNorm(8): **{unet.num_params:,} parameters**.
- Class-conditional, 11 class embeddings: digits 0-9 plus NULL class {NULL_CLASS}
  (unconditional, for classifier-free guidance: `eps = eps_null + w * (eps_c - eps_null)`).
- DDPM, 1000 steps, linear betas 1e-4 -> 0.02, epsilon prediction (`scheduler_config.json`).
- Trained {cfg.iterations} iterations, batch {cfg.batch_size}, AdamW lr {cfg.lr} with
  {cfg.warmup_iterations}-step linear warm-up and cosine decay, grad-norm clip {cfg.grad_clip},
  label dropout {cfg.label_dropout}; shipped weights are the EMA ({cfg.ema_decay}).
- Training time: **{unet.seconds / 60:.1f} min** ({unet.seconds:.0f} s, {cfg.num_threads} CPU
  thread(s)). Final training loss (mean of last {_LOSS_WINDOW} iterations): **{unet.final_loss:.4f}**.
- {FD_LINE}

## Metric classifier (`{CLASSIFIER_SUBDIR}/`, {_file_size(clf_file)})
- `rldiff.data.classifier.DigitClassifier`: 2x(conv-conv-maxpool) (32, 64 channels), 128-d ReLU
  feature layer (used for Fréchet distances), linear head: **{clf.num_params:,} parameters**.
- Trained {cfg.classifier_epochs} epochs, Adam lr {cfg.classifier_lr} (cosine), batch
  {cfg.classifier_batch_size}, random shifts up to {cfg.classifier_max_shift} px.
- Training time: **{clf.seconds:.1f} s**. Test accuracy: **{clf.test_accuracy:.2%}** (360 images).

## All settings
| field | value | meaning |
|---|---|---|
{settings}
"""


def pretrain(cfg: PretrainConfig) -> tuple[UnetResult, ClassifierResult]:
    """Train both models into ``cfg.out_dir`` and write the model card there."""
    clf = train_classifier(cfg)
    print(f"classifier: test accuracy {clf.test_accuracy:.2%} in {clf.seconds:.1f} s")
    unet = train_unet(cfg)
    print(f"unet: final loss {unet.final_loss:.4f} in {unet.seconds / 60:.1f} min")
    card = Path(cfg.out_dir) / MODEL_CARD_NAME
    card.write_text(model_card(cfg, unet, clf))
    print(f"wrote {unet.path}, {clf.path}, {card}")
    return unet, clf


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One ``--flag`` per :class:`PretrainConfig` setting."""
    return add_flags(parser, PretrainConfig)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    return from_flags(PretrainConfig, args)
