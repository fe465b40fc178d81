"""After a Tune search: every finished trial exported and scored on held-out seeds, the winner
picked and exported, and the trial table and plot written.

Held-out scoring, never the training reward: each finished trial's final checkpoint is exported
(``rldiff.rl.export.export_policy``) and sampled with the evaluation protocol's scoring
(``rldiff.evaluation.protocol``: reference RMSE from the same noise, NFE counted per sample) at every target
budget, beside the conditional table (the experts' own schedules: the reward's zero) or, for a
policy trained around one schedule, the base expert's global schedule, over the condition mix. The
selection seeds (``SELECTION_SEED_OFFSET + i``) are disjoint from the training seeds and from the
evaluation seeds of the winner's report, so the report is not flattered by having picked the best
of many trials on the very samples it is scored on.

Score of a trial: the geometric mean over the target budgets of mean RMSE over that base's mean
RMSE (lower is better; below 1 beats it; each budget weighs the
same however small its RMSE). Ties: trials within ``tie_tolerance`` (relative, default 1 %) of the
best score are tied on quality, and among them the one with the fewest mean NFE wins (a policy
trained with a cost per NFE may stop before its budget), then the better score, then the trial id.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from rldiff.baselines.specs import PolicySpec
from rldiff.baselines.table import table_of_entries
from rldiff.evaluation.parallel import connect_ray, parallel_map
from rldiff.evaluation.protocol import EVAL_SEED_OFFSET, score_policy, seed_set
from rldiff.evaluation.quality import distribution_metrics
from rldiff.rl.export import export_policy
from rldiff.rl.train import LEARNED_NAME, evaluate_policies
from rldiff.search.space import METRIC, trial_config

SELECTION_SEED_OFFSET = EVAL_SEED_OFFSET + 500_000  # held out from training and from the report
FINAL_METRICS = (  # the last training result's figures kept in the table, as train/<name>
    METRIC,
    "charts/reward_mean",
    "charts/nfe_mean",
    "charts/router_entropy",
    "charts/seconds_per_iteration",
)


def summarise(grid, settings, out: Path, ev, denoiser) -> dict:
    """Exports and scores every finished trial of ``grid`` (a ``ResultGrid``), writes
    ``trials.parquet``, ``trials.csv``, ``trials.png`` and ``winner/``; returns a summary."""
    budgets = target_budgets(settings)
    rows, curves = [], {}
    for result in grid:
        row = trial_row(result, settings)
        if row["status"] != "error" and result.checkpoint is not None:
            row["policy"] = str(export_trial(result, row, settings, out / "trials"))
        rows.append(row)
        frame = result.metrics_dataframe
        if frame is not None and METRIC in frame:
            curves[row["trial_id"]] = (frame["training_iteration"].tolist(), frame[METRIC].tolist())
    base = score_trials(rows, settings, budgets, ev, denoiser)
    winner = choose_winner(rows, settings.tie_tolerance)
    for row in rows:
        row["winner"] = winner is not None and row["trial_id"] == winner["trial_id"]
    rows.sort(key=lambda r: (not math.isfinite(r.get("heldout/score", math.nan)), _score_of(r)))
    write_table(rows, out)
    plot_trials(rows, curves, out / "trials.png")
    summary = {
        "trials": len(rows),
        "finished": sum(r["status"] != "error" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "global": base,
        "winner": None if winner is None else winner["trial_id"],
    }
    if winner is None:
        print("no trial finished with a checkpoint: no winner")
        return summary
    summary["winner_dir"] = str(export_winner(winner, settings, budgets, out, ev, denoiser))
    summary["winner_score"] = winner["heldout/score"]
    print(
        f"winner: {winner['trial_id']} (held-out score {winner['heldout/score']:.3f}) -> "
        f"{summary['winner_dir']}"
    )
    return summary


def target_budgets(settings) -> tuple[int, ...]:
    """The budgets trials are scored at: ``target_budgets``, or every training budget."""
    budgets = tuple(sorted(settings.target_budgets or settings.train.budgets))
    missing = sorted(set(budgets) - set(settings.train.budgets))
    if missing:
        raise ValueError(
            f"target budgets {missing} are not training budgets {settings.train.budgets}"
        )
    return budgets


def trial_row(result, settings) -> dict:
    """One trial: id, status, iterations, its parameters and its final training metrics."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
    iterations = int(metrics.get("training_iteration", 0))
    if result.error is not None:
        status = "error"
    else:
        status = "completed" if iterations >= settings.train.iterations else "stopped early"
    row = {"trial_id": trial_id, "status": status, "iterations": iterations}
    row.update({k: result.config.get(k) for k in settings.space})
    row.update({f"train/{k.split('/')[-1]}": metrics.get(k, math.nan) for k in FINAL_METRICS})
    row["error"] = "" if result.error is None else str(result.error).splitlines()[0][:200]
    row["path"] = str(result.path)
    return row


def export_trial(result, row: dict, settings, directory: Path) -> Path:
    """The trial's final checkpoint as a policy directory ``directory/<trial id>/policy``."""
    cfg = trial_config(settings.train, result.config)
    final = {k: v for k, v in (result.metrics or {}).items() if "/" in k}
    summary = {"trial_id": row["trial_id"], "iteration": row["iterations"], "final": final}
    with result.checkpoint.as_directory() as checkpoint:
        target = directory / row["trial_id"] / "policy"
        target.parent.mkdir(parents=True, exist_ok=True)
        return export_policy(checkpoint, target, cfg, cfg.base_schedules, summary)


def score_trials(rows: list[dict], settings, budgets, ev, denoiser) -> dict:
    """Adds ``heldout/*`` to every row with a policy: per-budget RMSE, its ratio to the global
    schedule, mean NFE, and the score (see the module docstring). Returns the global schedule's
    RMSE per budget."""
    cfg = settings.train
    if isinstance(cfg.base_schedules, list):  # own schedules: the conditional table
        base_name = "table"
        path = Path(ev.out) / "table.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        table_of_entries(cfg.base_schedules).save(path)
        specs = [
            PolicySpec("table", "table", "table", b, path=str(path.resolve())) for b in budgets
        ]
    else:
        base_name = f"global:{cfg.base_expert}"
        specs = [
            PolicySpec(base_name, "global", cfg.base_expert, b, sigmas=tuple(cfg.base_schedules[b]))
            for b in budgets
        ]
    scored = [r for r in rows if r.get("policy")]
    specs += [
        PolicySpec(r["trial_id"], "learned", "router", b, path=r["policy"])
        for r in scored
        for b in budgets
    ]
    selection = seed_set(ev, denoiser, SELECTION_SEED_OFFSET, settings.select_samples, "select")
    shape = getattr(denoiser, "sample_shape", None)
    metrics = distribution_metrics(ev.model, ev.metric_network, shape)  # None: FD is NaN
    context = (denoiser, selection, metrics)
    print(
        f"scoring {len(scored)} trials on {settings.select_samples} held-out samples at {budgets}"
    )
    found = parallel_map(score_policy, specs, context, connect_ray(ev.ray), "held-out scoring")
    by = {(row["policy"], row["budget"]): row for row, _ in found}
    for r in scored:
        ratios = []
        for b in budgets:
            rmse = by[(r["trial_id"], b)]["rmse_mean"]
            ratios.append(rmse / by[(base_name, b)]["rmse_mean"])
            r[f"heldout/rmse@{b}"], r[f"heldout/rmse_ratio@{b}"] = rmse, ratios[-1]
            r[f"heldout/nfe@{b}"] = by[(r["trial_id"], b)]["mean_nfe"]
        r["heldout/score"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        r["heldout/mean_nfe"] = sum(r[f"heldout/nfe@{b}"] for b in budgets) / len(budgets)
        r["heldout/fd_mean"] = sum(by[(r["trial_id"], b)]["fd"] for b in budgets) / len(budgets)
    return {f"rmse@{b}": by[(base_name, b)]["rmse_mean"] for b in budgets}


def choose_winner(rows: list[dict], tolerance: float) -> dict | None:
    """The best held-out score; within ``tolerance`` of it, the fewest mean NFE (module docstring)."""
    scored = [r for r in rows if math.isfinite(r.get("heldout/score", math.nan))]
    if not scored:
        return None
    best = min(r["heldout/score"] for r in scored)
    tied = [r for r in scored if r["heldout/score"] <= best * (1 + tolerance)]
    return min(tied, key=lambda r: (r["heldout/mean_nfe"], r["heldout/score"], r["trial_id"]))


def export_winner(winner: dict, settings, budgets, out: Path, ev, denoiser) -> Path:
    """``out/winner``: ``policy/``, ``train_config.json``, ``trial.json`` (its row and the rule
    it was picked by) and ``evaluation/`` (the full protocol with it beside every baseline).
    Written under a temporary name and swapped in, so ``winner/`` is always whole."""
    target, tmp = out / "winner", out / "winner.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(winner["policy"], tmp / "policy")
    cfg = trial_config(settings.train, {k: winner[k] for k in settings.space})
    (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    picked = {
        "score": "geometric mean over the target budgets of held-out mean RMSE / global schedule's",
        "target_budgets": list(budgets),
        "selection_seeds": [SELECTION_SEED_OFFSET, SELECTION_SEED_OFFSET + settings.select_samples],
        "tie_tolerance": settings.tie_tolerance,
        "tie_break": "fewest held-out mean NFE among scores within the tolerance of the best",
    }
    trial = {**winner, "policy": str(target / "policy"), "picked_by": picked}
    (tmp / "trial.json").write_text(json.dumps(trial, indent=2, default=str))
    print(f"winner {winner['trial_id']}: evaluation protocol on {ev.n_samples} held-out samples")
    evaluate_policies(
        dataclasses.replace(ev, out=tmp / "evaluation"), {LEARNED_NAME: tmp / "policy"}, denoiser
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def write_table(rows: list[dict], out: Path) -> None:
    """``trials.parquet`` and ``trials.csv``: one row per trial, best held-out score first."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_parquet(out / "trials.parquet", index=False)
    frame.to_csv(out / "trials.csv", index=False)


def plot_trials(rows: list[dict], curves: dict, path: Path) -> None:
    """Training curves of ``charts/rmse_vs_base`` (``METRIC``) per trial (left) and the held-out score per
    trial (right), the winner in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    winner = next((r["trial_id"] for r in rows if r.get("winner")), None)
    for trial_id, (steps, values) in curves.items():
        style = {"color": "red", "lw": 2, "zorder": 3} if trial_id == winner else {"lw": 1}
        left.plot(steps, values, label=trial_id, **style)
    left.axhline(1.0, color="0.5", ls="--", lw=0.8)
    left.set(xlabel="training iteration", ylabel="training RMSE / base schedule's")
    left.set_title("training (ASHA's metric)", fontsize=10)
    if curves:
        left.legend(fontsize=7, ncol=2)
    scored = [r for r in rows if math.isfinite(r.get("heldout/score", math.nan))]
    names = [r["trial_id"] for r in scored]
    colours = ["red" if r["trial_id"] == winner else "tab:blue" for r in scored]
    right.bar(range(len(scored)), [r["heldout/score"] for r in scored], color=colours)
    right.set_xticks(range(len(scored)), names, rotation=45, ha="right", fontsize=7)
    right.axhline(1.0, color="0.5", ls="--", lw=0.8)
    right.set(ylabel="held-out RMSE / global schedule's (geo. mean)")
    right.set_title("held-out score per finished trial (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _score_of(row: dict) -> float:
    score = row.get("heldout/score", math.nan)
    return score if math.isfinite(score) else math.inf
