"""Train the router and the solver experts jointly with multi-agent PPO, then export and evaluate.

What it does: loads (from the shipped precomputed inputs or the cache; else optimises) the base
expert's global schedule per NFE budget as the base schedule, builds the training reference bank,
trains router + experts (``moe``) with RLlib PPO (one progress line per iteration, TensorBoard
event files, a checkpoint every ``--checkpoint-every`` iterations and at the end), then the
``ppo-single`` ablation (UniPC alone, step size only; ``--no-ablations`` skips it), exports both
policies (loadable without Ray: ``rldiff.baselines.learned.LearnedPolicy.load``), and runs the
evaluation protocol with them beside every baseline, the bandit included.

How to run (from the repository root)::

    python jobs/train.py --out runs/main                     # the main job (= make demo); --help
    python jobs/train.py --out runs/main --resume            # continue a killed run
    python jobs/train.py --model gmm --iterations 30 --out runs/train-gmm --cache .cache/rldiff-gmm
    tensorboard --logdir runs/main/tensorboard               # separate package

Locally it starts Ray itself (on 127.0.0.1 only). On a cluster (``RAY_ADDRESS`` is set for the
job's driver; multi-node runs need ``--out`` and ``--cache`` on shared storage)::

    ray job submit --working-dir . -- python jobs/train.py --iterations 200 \\
        --env-runners 4 --out /shared/runs/train-unet --cache /shared/cache

What to expect on the embedded model with the defaults: about 14 minutes on 2 CPU cores (40
iterations of ~9 s for ``moe``, 40 of ~6 s for ``ppo-single``, then the evaluation).
``OUT/evaluation/report.md`` shows the learned policies beside the best hand-built and best global
schedule per budget: about 0.5-0.7x the best hand-built RMSE at 4-8 NFE and within a few per cent
of the optimised global schedule; ``schedules.png`` plots the schedules ``moe`` chose, coloured by
expert. Also ``OUT/progress.jsonl``, ``OUT/tensorboard/`` (``charts/*`` quality, NFE and
expert usage, ``losses/<module>/*``), ``OUT/checkpoints/iter_XXXX``, ``OUT/policy/``
and ``OUT/ablations/ppo-single/``. See the README for measured numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

if __name__ == "__main__":
    from rldiff.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
