"""Pretrain the embedded default diffusion model and the metric classifier.

Trains a class-conditional DDPM UNet (~0.8 M params) and a small CNN digit classifier on the
train split of scikit-learn's digits (16x16), then writes safetensors weights, configs and a
model card. Deterministic: same arguments, same files.

Run (from the repository root)::

    python jobs/pretrain.py [--iterations N] [--out DIR]      # all flags: --help

Expect, with the defaults on 1 CPU thread: the classifier in ~10 s (~99 % test
accuracy), then 3000 UNet iterations with a tqdm bar showing the loss (about 20 min here), and
in ``DIR`` (default: ``rldiff/assets``) ``digits-unet/``, ``digits-classifier/`` and
``MODEL_CARD.md``. Smoke test: ``--iterations 50 --classifier-epochs 1 --out /tmp/x`` takes
well under a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Let `python jobs/pretrain.py` work from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    """Parse flags into a PretrainConfig and run the pretraining."""
    from rldiff.data.pretrain import add_arguments, config_from_args, pretrain

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    pretrain(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
