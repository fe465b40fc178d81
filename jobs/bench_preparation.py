"""Benchmark: the training driver's preparation, timed where the driver would run it.

This times what ``rldiff train`` does once on the driver before any env runner starts, from an
empty cache (the shipped inputs are not used): the reference bank of the training seeds (200-step
UniPC solves, checked against 400 steps) and the base expert's global schedule search at the
training budgets. It runs on this process's GPU when it sees one (``visible_device``), else on the
CPU, with TF32 off, and prints the seconds of each part.

How to run (from the repository root)::

    .venv/bin/python jobs/bench_preparation.py                  # the embedded model, 128 seeds
    .venv/bin/python jobs/bench_preparation.py --device cpu     # force the CPU

Results to expect: on one H200 a few seconds for the bank and under a minute for the search; on
the CPU of the same machine the bank took 69 s and the search 3 min (2 CPU cores: a few minutes
each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--train-samples", type=int, default=128)
    parser.add_argument("--budgets", default="4,5,6,8")
    args = parser.parse_args()

    import torch

    from rldiff.config import EvaluateConfig
    from rldiff.data.models import load_model, visible_device
    from rldiff.evaluation.protocol import optimise_global_schedules, seed_set

    torch.set_num_threads(1)
    device = visible_device() if args.device == "auto" else args.device
    denoiser = load_model(args.model, device)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    with tempfile.TemporaryDirectory() as cache:
        cfg = EvaluateConfig(
            model=args.model,
            n_train=args.train_samples,
            budgets=budgets,
            global_solvers=("unipc",),
            cache=Path(cache),
            ray="off",
        )
        start = time.perf_counter()
        train = seed_set(cfg, denoiser, 0, cfg.n_train, "train")
        bank = time.perf_counter() - start
        start = time.perf_counter()
        optimise_global_schedules(cfg, denoiser, train, use_ray=False)
        search = time.perf_counter() - start
    print(f"device {device}: training reference bank ({cfg.n_train} seeds) {bank:.1f} s")
    print(f"device {device}: global schedule search (unipc, budgets {budgets}) {search:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
