"""The embedded dataset: scikit-learn's bundled 8x8 digits, upsampled to 16x16.

Contract: ``load_digits16(split)`` returns ``(images, labels)`` with images float32
``[N, 1, 16, 16]`` in ``[-1, 1]`` and labels int64 ``[N]`` in ``0..9``. The train/test
split is stratified, about 80/20, and fixed (seed 0), so every run of every tool sees
the same images. Everything is offline: the data ships inside scikit-learn.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SHAPE: tuple[int, int, int] = (1, 16, 16)
NUM_CLASSES: int = 10

SPLITS: tuple[str, ...] = ("train", "test")
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0
_MAX_PIXEL = 16.0  # sklearn digits are integer intensities 0..16


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    """Deterministic stratified train/test indices into the 1797 digits."""
    labels = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=_TEST_FRACTION,
        random_state=_SPLIT_SEED,
        stratify=labels,
    )
    # Sorted so the order does not depend on the shuffle, only the membership does.
    return {"train": np.sort(train_idx), "test": np.sort(test_idx)}


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """Map raw 8x8 intensities (0..16) to 16x16 images in [-1, 1]."""
    x = pixels.reshape(-1, 1, 8, 8).float() / _MAX_PIXEL
    x = F.interpolate(x, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
    # Bilinear interpolation of values in [0, 1] stays in [0, 1]; clamp guards rounding.
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits16(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images [N,1,16,16] float32 in [-1,1], labels [N] int64)`` for a split.

    ``split`` is ``"train"`` (1437 images) or ``"test"`` (360 images).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digits = load_digits()
    idx = _split_indices()[split]
    images = to_model_range(torch.from_numpy(digits.data[idx]))
    labels = torch.from_numpy(digits.target[idx]).long()
    return images.contiguous(), labels
