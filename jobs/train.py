"""Train the router and the solver experts jointly with multi-agent PPO, then export and evaluate.

What it does: optimises (or loads from the cache) the base expert's global schedule per NFE budget
as the warm start, builds the training reference bank, trains router + experts with RLlib PPO
(one progress line per iteration, TensorBoard event files, a checkpoint every
``--checkpoint-every`` iterations and at the end), exports the policy to ``OUT/policy`` (loadable
without Ray: ``rldiff.learned_policy.LearnedPolicy.load``), and runs the evaluation protocol with
the learned policy ("moe") beside every baseline.

How to run (from the repository root)::

    python jobs/train.py --model gmm --iterations 30 --out runs/train-gmm     # all flags: --help
    python jobs/train.py --model gmm --iterations 60 --out runs/train-gmm --resume
    tensorboard --logdir runs/train-gmm/tensorboard                          # separate package

Locally it starts Ray itself (on 127.0.0.1 only). On a cluster (``RAY_ADDRESS`` is set for the
job's driver; multi-node runs need ``--out`` and ``--cache`` on shared storage)::

    ray job submit --working-dir . -- python jobs/train.py --model embedded --iterations 200 \\
        --env-runners 4 --out /shared/runs/train-unet --cache /shared/cache

What to expect: ``OUT/progress.jsonl`` and ``OUT/tensorboard/`` (``rldiff/*`` quality and NFE,
``charts/expert_usage/*``, ``losses/<module>/*``), ``OUT/checkpoints/iter_XXXX``, ``OUT/policy/``
and ``OUT/evaluation/`` with ``report.md`` (the "learned" rows beside the best hand-built and best
global schedule per budget), ``results.parquet``, ``pareto.png`` and ``schedules.png`` (the
schedules the policy chose, coloured by expert). The first run on the embedded UNet spends several
minutes on the global schedule search (cached afterwards). See the README for measured numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

if __name__ == "__main__":
    from rldiff.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
