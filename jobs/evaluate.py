"""Evaluate every non-learned policy at every NFE budget on the embedded model (or any model).

What it does: builds (or loads from the cache) the reference solutions for fixed held-out seeds,
optimises a global schedule per solver and budget on disjoint training seeds, then scores every
hand-built solver x schedule, the global schedules and the error-controlled adaptive policy at
NFE budgets 3, 4, 5, 6, 8 and 10.

How to run (from the repository root; on a cluster: ``ray job submit --working-dir . -- python
jobs/evaluate.py --ray auto``)::

    python jobs/evaluate.py --out runs/evaluate            # all flags: --help

What to expect: ``runs/evaluate/report.md`` (the table with the real-data floors beside it),
``results.parquet`` (one row per policy and budget), ``pareto.png`` (quality vs mean NFE) and
``grid_nfe<B>.png`` sample grids. The optimised global schedules beat the best hand-built ones
by a wide margin at 3-6 NFE; see the README for the measured numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

if __name__ == "__main__":
    from rldiff.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
