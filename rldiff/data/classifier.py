"""A small CNN digit classifier, used only to measure sample quality.

Contract: ``DigitClassifier.features(x)`` maps images ``[B, 1, 16, 16]`` in ``[-1, 1]`` to
``[B, 128]`` penultimate features (the space for Fréchet distances) and ``forward(x)`` to
``[B, 10]`` logits. Weights travel only as safetensors plus a ``config.json`` holding the
constructor arguments; ``load_classifier()`` defaults to the copy shipped in the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rldiff.data.digits import IMAGE_SHAPE, NUM_CLASSES

DEFAULT_CLASSIFIER_DIR: Path = Path(__file__).parent.parent / "assets" / "digits-classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_FORMAT = "rldiff-digit-classifier"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convs then a 2x2 max-pool (halves the resolution)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class DigitClassifier(nn.Module):
    """16x16 -> 8x8 -> 4x4 conv trunk, a 128-d feature layer, and a linear head."""

    def __init__(
        self,
        in_channels: int = IMAGE_SHAPE[0],
        channels: tuple[int, int] = (32, 64),
        feature_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "channels": list(channels),
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        spatial = IMAGE_SHAPE[1] // 4  # two max-pools
        self.trunk = nn.Sequential(
            _conv_block(in_channels, channels[0]),
            _conv_block(channels[0], channels[1]),
            nn.Flatten(),
            nn.Linear(channels[1] * spatial * spatial, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` for images ``[B, 1, 16, 16]``."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(x))


def save_classifier(
    model: DigitClassifier, directory: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; return it.

    ``extra`` (e.g. measured test accuracy) is stored under ``"info"`` in the config.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"format": _FORMAT, **model.config, "info": extra or {}}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_classifier(directory: str | Path | None = None) -> DigitClassifier:
    """Load a classifier (eval mode, CPU) from ``directory`` or the shipped default."""
    src = Path(directory) if directory is not None else DEFAULT_CLASSIFIER_DIR
    weights, config_path = src / WEIGHTS_NAME, src / CONFIG_NAME
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"digit classifier file missing: {path}; run `rldiff pretrain` to create it"
            )
    config = json.loads(config_path.read_text())
    kwargs = {k: config[k] for k in ("in_channels", "feature_dim", "num_classes", "dropout")}
    model = DigitClassifier(channels=tuple(config["channels"]), **kwargs)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()
