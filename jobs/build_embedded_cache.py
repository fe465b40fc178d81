"""Recompute and re-ship the embedded model's precomputed evaluation inputs.

What it does: runs the evaluation protocol on the embedded model at the default settings (which
builds, or reuses from ``--cache``, the reference banks of the held-out and training seeds over the
condition mix, the optimised global and per-guidance schedules, the oracle's per-sample plans and
the baseline scores), adds the training seeds' banks at each guidance scale (what training reads),
then copies exactly those files into
``rldiff/assets/embedded-cache/``, from where ``rldiff.data.shipped_cache.seed_cache`` puts them into a
fresh cache so the main job does not spend its first ~25 minutes recomputing them.

How to run (from the repository root)::

    python jobs/build_embedded_cache.py                  # --cache .cache/rldiff by default

What to expect: about 25 minutes on 2 CPU cores from an empty cache, seconds from a full one; the
list of shipped files and their total size (a few MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/rldiff"))
    args = parser.parse_args()

    from rldiff.data.models import EMBEDDED, load_model
    from rldiff.data.reference import bank_path, seed_bank
    from rldiff.data.shipped_cache import SCHEDULES, SHIPPED
    from rldiff.evaluation.protocol import (
        EVAL_SEED_OFFSET,
        MODEL_CHECK,
        EvaluateConfig,
        ScoreCache,
        guidance_schedules,
        load_score,
        optimise_global_schedules,
        oracle_specs,
        policy_specs,
        run_evaluation,
        save_score,
        schedule_cache_key,
        seed_set,
    )

    with tempfile.TemporaryDirectory() as out:
        cfg = EvaluateConfig(out=Path(out), cache=args.cache, bandit_rounds=0, ray="local")
        run_evaluation(cfg)  # everything below now exists in the cache
    denoiser = load_model(EMBEDDED)
    steps, seeds = cfg.reference_steps, list(range(cfg.n_train))
    banks = [
        bank_path(args.cache, denoiser, name, n, cfg.guidance, steps)
        for name, n in (("eval", cfg.n_samples), ("train", cfg.n_train))
    ]
    for g in cfg.guidance:  # what training reads: every training seed at every scale
        seed_bank(args.cache, denoiser, "train", seeds, g, steps)
        banks.append(bank_path(args.cache, denoiser, "train", cfg.n_train, g, steps))
    train = seed_set(cfg, denoiser, 0, cfg.n_train, "train")
    held_out = seed_set(cfg, denoiser, EVAL_SEED_OFFSET, cfg.n_samples, "eval")
    sigmas = optimise_global_schedules(cfg, denoiser, train, use_ray=False)  # cached: no search
    own = guidance_schedules(cfg, denoiser, train, use_ray=False)
    oracle = oracle_specs(cfg, denoiser, held_out, own, use_ray=False)  # cached: no search
    key = schedule_cache_key(cfg, denoiser)
    schedules = json.loads((args.cache / SCHEDULES).read_text())
    mine = {k: v for k, v in schedules.items() if k.startswith(f"{key}|")}
    scores = ScoreCache(cfg, denoiser)
    paths = [scores.path(s) for s in policy_specs(cfg, sigmas) + oracle + [MODEL_CHECK]]

    shutil.rmtree(SHIPPED, ignore_errors=True)
    (SHIPPED / "scores").mkdir(parents=True)
    for bank in banks:
        shutil.copyfile(bank, SHIPPED / bank.name)
    for path in paths:  # saved anew: older cache entries may hold the whole batch, not the grid
        save_score(SHIPPED / "scores" / path.name, load_score(path))
    (SHIPPED / "oracle").mkdir()
    for spec in oracle:
        shutil.copyfile(spec.path, SHIPPED / "oracle" / Path(spec.path).name)
    (SHIPPED / SCHEDULES).write_text(json.dumps(mine, indent=1))
    files = sorted(p for p in SHIPPED.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"shipped {len(files)} files, {size / 1e6:.1f} MB, to {SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
