"""Search the training configuration with Ray Tune, then pick and export the winner.

What it does: prepares what every trial shares once (the base expert's optimised global schedule
per budget, the training reference bank), runs a Tune search over the training configuration
(learning rate, entropy bonuses, PPO clip, network sizes, the reward's cost per NFE, the step
range, the experts in play, the router warm start) with ASHA early stopping on
``charts/rmse_vs_base``, as many trials at once as the cluster's CPUs and GPUs hold, retries of
failed trials and a checkpoint per trial. Then every finished trial is exported and scored on
held-out seeds, the winner is exported with its evaluation report, and the trials are tabulated
and plotted.

How to run (from the repository root)::

    python jobs/tune.py --preset quick --out runs/tune-quick --cache .cache/rldiff-gmm
    python jobs/tune.py --preset quick --out runs/tune-quick --resume    # after an interruption
    tensorboard --logdir runs/tune-quick/search                          # separate package

On a cluster (``RAY_ADDRESS`` is set for the job's driver; multi-node searches need shared
storage for ``--storage-path``, ``--out`` and ``--cache``)::

    ray job submit --working-dir . -- python jobs/tune.py --preset full \\
        --out /shared/runs/tune-full --storage-path /shared/tune --cache /shared/cache

What to expect: ``OUT/trials.csv`` / ``trials.parquet`` (one row per trial: parameters, final
training metrics, held-out score, status), ``OUT/trials.png``, ``OUT/search/trial_<id>/`` (Tune's
results, TensorBoard event files, checkpoints) and ``OUT/winner/`` (``policy/`` for
``LearnedPolicy.load`` and Serve, ``train_config.json``, ``trial.json``, ``evaluation/report.md``).
The quick preset (8 trials on the exact mixture model, 2 at a time) took 9 minutes on 2 shared
cores (measured numbers in docs/tune.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

if __name__ == "__main__":
    from rldiff.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
