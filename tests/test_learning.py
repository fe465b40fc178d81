"""Learning, not only plumbing: a short PPO run on the exact Gaussian mixture (``gmm``) ends up
better than its base schedule (the base expert's optimised global schedule, reward 0) on held-out
seeds, scored with the exported policy. Slow: about 2-3 minutes on 2 busy cores.

    pytest tests/test_learning.py -m slow -s   # prints the ratios
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from rldiff.baselines.specs import PolicySpec
from rldiff.config import TrainConfig
from rldiff.data.models import load_model
from rldiff.evaluation.protocol import EVAL_SEED_OFFSET, score_policy, seed_set
from rldiff.rl.train import evaluation_config, run_training

# One budget: at 6 NFE a short run has room to beat the global schedule (at 4 NFE it takes longer
# than a slow test may run).
BUDGET = 6
HELD_OUT = 256  # evaluation seeds (EVAL_SEED_OFFSET on, never trained on)
QUIET = {"evaluate": False}  # scored here instead: the base schedule and the policy only


@pytest.mark.slow
def test_a_short_run_on_the_mixture_beats_its_base_schedule(ray_local, tmp_path):
    cfg = TrainConfig(
        model="gmm",
        budgets=(BUDGET,),
        cache=str(tmp_path / "cache"),
        hidden=(64, 64),
        lr=1e-3,  # 3x the default, so that 30 short iterations are enough
        train_batch_size=128,
        minibatch_size=128,
        env_runners=0,
        iterations=30,
        checkpoint_every=30,
    )
    # The same modules before any update (iterations=0 exports the freshly built ones).
    untrained = run_training(dataclasses.replace(cfg, iterations=0), tmp_path / "start", **QUIET)
    trained = run_training(cfg, tmp_path / "run", **QUIET)

    denoiser = load_model(cfg.model)
    ev = evaluation_config(cfg, tmp_path, HELD_OUT)
    held_out = seed_set(ev, denoiser, EVAL_SEED_OFFSET, HELD_OUT, "eval")

    def rmse(spec: PolicySpec) -> float:
        return score_policy(spec, (denoiser, held_out, None))[0]["rmse_mean"]

    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    sigmas = tuple(saved["base_schedules"][str(BUDGET)])
    base = rmse(PolicySpec("base", "global", cfg.base_expert, BUDGET, sigmas=sigmas))
    ratio = {
        name: rmse(PolicySpec(name, "learned", "router", BUDGET, path=_policy(run))) / base
        for name, run in (("untrained", untrained), ("trained", trained))
    }
    progress = [json.loads(line) for line in (tmp_path / "run" / "progress.jsonl").open()]
    train_ratio = [r.get("charts/rmse_vs_base", math.nan) for r in progress]
    reward = [r.get("charts/reward_mean", math.nan) for r in progress]
    print(
        f"\nheld-out RMSE / base schedule's at {BUDGET} NFE ({HELD_OUT} seeds, base RMSE "
        f"{base:.5f}): untrained {ratio['untrained']:.3f}, after {cfg.iterations} iterations "
        f"{ratio['trained']:.3f}\ntraining seeds (sampling policy): RMSE / base "
        f"{train_ratio[0]:.3f} -> {train_ratio[-1]:.3f}, reward {reward[0]:+.3f} -> "
        f"{reward[-1]:+.3f}; {trained['seconds_per_iteration']:.1f} s per iteration"
    )
    assert ratio["trained"] < 1  # better than the base schedule on seeds it never saw
    assert ratio["trained"] < ratio["untrained"]
    assert train_ratio[-1] < 0.5 * train_ratio[0] and reward[-1] > reward[0]


def _policy(run: dict) -> str:
    return str(Path(run["policy"]).resolve())
