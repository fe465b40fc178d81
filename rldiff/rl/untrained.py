"""An exported policy directory with freshly initialised (never trained) modules.

It has the architecture, files and loading path of a trained export (``export_policy`` over a
checkpoint-shaped directory), so the serving path can be tested and its latency measured without
a training run. Its decisions are random-initialised network outputs: never quality figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rldiff.rl.export import MODULES_IN_CHECKPOINT, export_policy


def untrained_policy(
    out_dir, model: str, budgets: tuple[int, ...], base_schedules=None, seed: int = 0
) -> Path:
    """Writes an exported policy for ``model`` to ``out_dir`` and returns it.

    ``base_schedules`` (``{budget: sigmas}``) is the base schedule; None means the logSNR split,
    which serves any budget.
    """
    from rldiff.config import TrainConfig
    from rldiff.rl.algo import fresh_modules

    torch.manual_seed(seed)
    cfg = TrainConfig(model=model, budgets=tuple(budgets), base_schedules=base_schedules)
    multi = fresh_modules(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        for m, module in multi.items():
            module.save_to_path(checkpoint.joinpath(*MODULES_IN_CHECKPOINT, m))
        summary = {"untrained": True, "iteration": 0}
        return export_policy(checkpoint, Path(out_dir), cfg, base_schedules, summary)
