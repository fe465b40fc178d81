"""The one training iteration loop, shared by ``rldiff train`` and every Tune trial.

``start_algorithm`` builds the algorithm (``rldiff.rl.algo.build_config``) or restores a checkpoint;
``iterations`` trains it up to ``cfg.iterations``, turning each RLlib result into one row under one
metric namespace, and says which iterations are due for a checkpoint. The namespace (CleanRL's):

- ``charts/*``: what the policy does and what an iteration costs: the env metrics of
  ``rldiff.rl.algo.RoutingMetrics`` (``charts/rmse_vs_base``, ``charts/reward_mean``,
  ``charts/nfe_mean``, ``charts/expert_usage/<expert>``, ``charts/router_entropy``, ...),
  ``charts/env_steps``, ``charts/seconds_per_iteration``, ``charts/{sample,learn}_seconds`` and
  ``charts/module_return/<module>``;
- ``losses/<module>/*``: PPO's learner figures per module.

A row is ``{"iteration": n, **metrics}``. ``rldiff train`` writes rows with ``RunLog``
(``progress.jsonl``, TensorBoard, one ``progress_line`` each) and ``save_checkpoint``s into
``iter_XXXX`` directories; a Tune trial reports the same metrics to Tune.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from rldiff.config import TrainConfig
from rldiff.core.solvers import EXPERT_NAMES
from rldiff.rl.algo import METRICS, build_config, module_ids

LOSSES = ("policy_loss", "vf_loss", "entropy", "mean_kl_loss", "vf_explained_var", "total_loss")
ENV_STEPS, SECONDS = "charts/env_steps", "charts/seconds_per_iteration"
CHECKPOINT = re.compile(r"^iter_(\d{4,})$")


def start_algorithm(cfg: TrainConfig, checkpoint: Path | None):
    """A new algorithm for ``cfg``, or the one saved in ``checkpoint``."""
    if checkpoint is None:
        return build_config(cfg).build_algo()
    from ray.rllib.algorithms.algorithm import Algorithm

    return Algorithm.from_checkpoint(str(Path(checkpoint).resolve()))  # a relative path fails


def iterations(algo, cfg: TrainConfig) -> Iterator[tuple[dict, bool]]:
    """Trains ``algo`` until its iteration reaches ``cfg.iterations``, yielding each iteration's
    row and whether a checkpoint is due (every ``cfg.checkpoint_every`` and the last)."""
    modules = module_ids(cfg.env_config().get("experts"))
    while algo.iteration < cfg.iterations:
        start = time.perf_counter()
        result = algo.train()
        row = iteration_row(result, modules, time.perf_counter() - start)
        yield row, row["iteration"] % cfg.checkpoint_every == 0 or algo.iteration >= cfg.iterations


def iteration_row(result: dict, modules, seconds: float) -> dict:
    """The figures worth keeping from RLlib's result dict, flat, JSON-able and namespaced."""
    runners = result.get("env_runners", {})
    custom = _flatten(runners.get(METRICS, {}))  # rldiff.rl.algo.RoutingMetrics
    row = {
        "iteration": int(result["training_iteration"]),
        ENV_STEPS: int(runners.get("num_env_steps_sampled_lifetime", 0)),
        SECONDS: seconds,
        **{f"charts/{k}": float(v) for k, v in custom.items()},
    }
    if custom.get("rmse_base_mean"):
        row["charts/rmse_vs_base"] = custom.get("rmse_mean", math.nan) / custom["rmse_base_mean"]
    timers = result.get("timers", {})
    for key, name in (("env_runner_sampling_timer", "sample"), ("learner_update_timer", "learn")):
        if key in timers:  # RLlib's smoothed timers: where an iteration's time goes
            row[f"charts/{name}_seconds"] = float(timers[key])
    returns = runners.get("module_episode_returns_mean", {})
    for m in modules:
        learner = result.get("learners", {}).get(m, {})
        row.update({f"losses/{m}/{k}": float(learner[k]) for k in LOSSES if k in learner})
        if m in returns:
            row[f"charts/module_return/{m}"] = float(returns[m])
    return row


def metrics(row: dict) -> dict:
    """The row's metrics: every key but the iteration."""
    return {k: v for k, v in row.items() if k != "iteration"}


def progress_line(row: dict, iteration: int) -> str:
    """One line of an iteration's metrics (a Tune result holds them too)."""
    usage = " ".join(
        f"{n} {row[k]:.2f}" for n in EXPERT_NAMES if (k := f"charts/expert_usage/{n}") in row
    )
    entropy = row.get("charts/router_entropy")  # absent: no router (one expert)
    return (
        f"iter {iteration:4d} | env steps {int(row[ENV_STEPS]):7d} | "
        f"reward {row.get('charts/reward_mean', math.nan):+.3f} | "
        f"rmse/base {row.get('charts/rmse_vs_base', math.nan):.3f} | "
        f"nfe {row.get('charts/nfe_mean', math.nan):.2f} | usage {usage or '-'} | "
        f"H(router) {'-' if entropy is None else f'{entropy:.3f}'} | {row[SECONDS]:.1f} s"
    )


class RunLog:
    """A run's record under ``out``: ``progress.jsonl``, TensorBoard scalars and a printed
    ``progress_line`` per row. Opened at ``iteration`` (the checkpoint being resumed, 0 for a new
    run): the rows after it, which will run again, are dropped."""

    def __init__(self, out: Path, iteration: int):
        from tensorboardX import SummaryWriter

        self.progress = out / "progress.jsonl"
        rows = [r for r in read_progress(self.progress) if r["iteration"] <= iteration]
        self.progress.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=iteration + 1)

    def __call__(self, row: dict) -> None:
        step = row["iteration"]
        for tag, value in metrics(row).items():
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        with self.progress.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(progress_line(row, step), flush=True)

    def close(self) -> None:
        self.writer.close()


def read_progress(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def save_checkpoint(algo, directory: Path) -> Path:
    """``algo.save`` into ``iter_XXXX`` via a temporary name: a kill mid-save leaves no partial
    checkpoint that ``latest_checkpoint`` would pick."""
    path = directory / f"iter_{algo.iteration:04d}"
    tmp = directory / f"{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save(str(tmp.resolve()))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The ``iter_XXXX`` checkpoint with the highest iteration (partial ``.tmp`` ones ignored)."""
    found = [
        (int(m.group(1)), p)
        for p in (directory.iterdir() if directory.is_dir() else [])
        if (m := CHECKPOINT.match(p.name)) and p.is_dir()
    ]
    return max(found)[1] if found else None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
