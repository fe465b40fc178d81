"""A Ray Tune search over the training configuration, then a winner picked on held-out seeds.

Each trial is one training run: a Tune function trainable (``train_trial``) turns the trial's
parameters into a ``TrainConfig`` (``rldiff.search.space.trial_config``) and trains it with
``rldiff.rl.loop``, the training loop of ``rldiff train`` (the algorithm from
``rldiff.rl.algo.build_config``, whose modules start warm), reporting its metrics (``charts/*``,
``losses/<module>/*``) with a checkpoint to Tune every ``checkpoint_every`` iterations. When Tune
restarts a trial (a failure within ``max_failures``, or a resumed search) it continues from
``tune.get_checkpoint()``.

What is shared by every trial is prepared once on the driver before the search by
``rldiff.rl.train.prepare_training``, as for ``rldiff train``: the shipped precomputed inputs of the
embedded model, every expert's own optimised schedule per budget and guidance (the best per budget
and guidance is the conditional table, the reward's zero) and the training reference banks (cached
on disk for the trials to read).

Early stopping: ASHA on ``charts/rmse_vs_base`` (training-seed RMSE over the base schedule's,
lower is better). Concurrency: as many trials as the cluster's CPUs (and GPUs) hold, each trial
taking 1 CPU plus 1 per env runner. After the search, ``rldiff.search.report`` exports every
finished trial, scores it on held-out seeds and exports the winner. Output layout under ``out``::

    tune.json  search/ (Tune's experiment: one trial_<id>/ per trial)  trials/<id>/policy/
    trials.parquet  trials.csv  trials.png  winner/{policy/, train_config.json, trial.json,
    evaluation/}
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from ray.tune import Callback

from rldiff.config import TUNE_TRAIN_FLAGS, TrainConfig, TuneSettings, add_flags, from_flags
from rldiff.data.models import EMBEDDED, EXACT_GMM, load_model, visible_device
from rldiff.rl.algo import gpus_per_env_runner
from rldiff.rl.loop import iterations, metrics, progress_line, start_algorithm
from rldiff.rl.train import config_from_json, evaluation_config, prepare_training, start_ray
from rldiff.search.space import (
    FULL_SPACE,
    METRIC,
    MODE,
    QUICK_SPACE,
    search_space,
    trial_config,
)

EXPERIMENT = "search"  # Tune's experiment directory name under the storage path
SETTINGS_FILE = "tune.json"


PRESETS = {
    # The exact mixture model, TrainConfig's batch sizes: about 9 s per iteration with 2 trials
    # at a time on 2 shared cores (13 s under heavy load); 8 trials of at most 16 iterations,
    # ASHA halving at 4 and 8 iterations: 9 minutes in all (17 under heavy load).
    "quick": lambda: TuneSettings(
        preset="quick",
        train=TrainConfig(model=EXACT_GMM, env_runners=0, iterations=16, checkpoint_every=1),
        space=dict(QUICK_SPACE),
        num_samples=8,
        grace_period=4,
        reduction_factor=2,
    ),
    # The embedded UNet on a GPU cluster: two env runners per trial (one GPU each where the
    # cluster has them), 32 trials of up to 200 iterations, ASHA thirds at 20, 60 and 180.
    "full": lambda: TuneSettings(
        preset="full",
        train=TrainConfig(
            model=EMBEDDED, env_runners=2, iterations=200, train_batch_size=512, checkpoint_every=10
        ),
        space=dict(FULL_SPACE),
        num_samples=32,
        grace_period=20,
        reduction_factor=3,
        max_failures=3,
    ),
}


def train_trial(params: dict, base: TrainConfig) -> None:
    """Tune function trainable: trains ``trial_config(base, params)`` with ``rldiff.rl.loop``,
    reporting every iteration and checkpointing every ``checkpoint_every`` and at the end; resumes
    from Tune's checkpoint."""
    from ray import tune

    torch.set_num_threads(1)
    cfg = trial_config(base, params)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        algo = start_algorithm(cfg, None)
    else:
        with checkpoint.as_directory() as directory:
            algo = start_algorithm(cfg, Path(directory))
    try:
        for row, due in iterations(algo, cfg):
            if not due:
                tune.report(trial_metrics(row))
                continue
            with tempfile.TemporaryDirectory(prefix="rldiff-checkpoint-") as directory:
                algo.save(directory)
                saved = tune.Checkpoint.from_directory(directory)
                tune.report(trial_metrics(row), checkpoint=saved)
    finally:
        algo.stop()


def trial_metrics(row: dict) -> dict:
    """A training iteration's metrics (Tune's TensorBoard tags), ``METRIC`` always present (NaN
    before any episode ended) since ASHA reads it from every result."""
    return {METRIC: math.nan, **metrics(row)}


def trial_bundles(cfg: TrainConfig) -> list[dict]:
    """Resources of one trial: 1 CPU for its driver (and learner), 1 CPU per env runner plus the
    GPU share ``build_config`` will ask for (placement groups capture the runners)."""
    gpu = gpus_per_env_runner(cfg.env_runners)
    runner = {"CPU": 1, **({"GPU": gpu} if gpu else {})}
    return [{"CPU": 1}] + [dict(runner) for _ in range(cfg.env_runners)]


def concurrency(bundles: list[dict], resources: dict, num_samples: int) -> int:
    """How many trials the cluster holds at once (at least 1, at most ``num_samples``)."""
    n = int(resources.get("CPU", 0) // sum(b["CPU"] for b in bundles))
    gpus = sum(b.get("GPU", 0) for b in bundles)
    if gpus:
        n = min(n, int(resources.get("GPU", 0) / gpus + 1e-9))
    return max(1, min(n, num_samples))


def run_tune(
    settings: TuneSettings,
    out: Path,
    resume: bool = False,
    eval_overrides: dict | None = None,
    callbacks: list | None = None,
    dashboard: bool = False,
) -> dict:
    """Runs (or resumes) the search, then scores, tabulates and exports the winner
    (``rldiff.search.report``). Returns a summary; ``status`` is "interrupted" when the search was
    stopped before every trial finished (``resume`` continues it). ``eval_overrides`` replace
    ``EvaluateConfig`` fields (small protocols in tests); ``callbacks`` are extra Tune callbacks."""
    from ray import tune

    from rldiff.search.report import summarise, target_budgets

    torch.set_num_threads(1)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / SETTINGS_FILE).exists():
        settings = _resumed_settings(settings, out / SETTINGS_FILE)
    cfg = _absolute_paths(settings.train)
    storage = settings.storage_path or str(out)
    experiment = f"{storage.rstrip('/')}/{EXPERIMENT}"
    target_budgets(settings)  # fails fast on budgets the trials are not trained at
    ev = evaluation_config(cfg, out, settings.eval_samples, eval_overrides)
    # Fails fast on a bad model spec, before Ray starts; prepares on the GPU where there is one.
    denoiser = load_model(cfg.model, visible_device())
    started_ray = start_ray(dashboard)
    try:
        import ray

        restore = tune.Tuner.can_restore(experiment)
        if restore and not resume:
            raise ValueError(f"{experiment} holds a search already: pass --resume or a new --out")
        if resume and not restore:
            print(f"nothing to resume in {experiment}: starting a new search")
        cfg = prepare_training(cfg, ev, denoiser)  # once here, not in every trial
        settings = dataclasses.replace(settings, train=cfg)
        (out / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(settings), indent=2))
        bundles = trial_bundles(cfg)
        limit = settings.max_concurrent or concurrency(
            bundles, ray.cluster_resources(), settings.num_samples
        )
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, base=cfg),
            tune.PlacementGroupFactory(bundles, strategy="PACK"),
        )
        print(
            f"search: {settings.num_samples} trials of up to {cfg.iterations} iterations, "
            f"{limit} at a time ({sum(b['CPU'] for b in bundles)} CPU each) -> {experiment}"
        )
        start = time.perf_counter()
        if restore:
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
        else:
            tuner = _new_tuner(settings, trainable, storage, limit, callbacks or [])
        grid = tuner.fit()
        seconds = time.perf_counter() - start
        finished = finished_trials(experiment)
        if finished < settings.num_samples:
            print(f"search interrupted: {finished}/{settings.num_samples} trials finished")
            return {"status": "interrupted", "experiment": experiment, "finished": finished}
        summary = summarise(grid, settings, out, ev, denoiser)
        return {"status": "done", "experiment": experiment, "search_seconds": seconds, **summary}
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def finished_trials(experiment: str) -> int:
    """Trials finished (or failed for good) in the experiment's saved state. Not the result grid's
    statuses: after an interruption Tune stops the running trials as TERMINATED in memory, but it
    saved their state as running first, and that is what a resumed search continues."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment).trials
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def _new_tuner(settings: TuneSettings, trainable, storage: str, limit: int, callbacks: list):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=settings.train.iterations,
        grace_period=min(settings.grace_period, settings.train.iterations),
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=search_space(settings.space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            scheduler=scheduler,
            # max_concurrent_trials is ignored beside a generator instance: the limit goes here.
            search_alg=BasicVariantGenerator(
                max_concurrent=limit, random_state=settings.search_seed
            ),
            num_samples=settings.num_samples,
            time_budget_s=settings.time_budget_s,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=storage,
            stop={"training_iteration": settings.train.iterations},
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            callbacks=[ProgressLines(), *callbacks],
            verbose=0,  # ProgressLines prints one line per trial result instead
        ),
    )


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Trials run in their own working directories: relative paths must not follow them."""
    model = cfg.model
    if model not in (EMBEDDED, EXACT_GMM) and Path(model).exists():
        model = str(Path(model).resolve())
    return dataclasses.replace(cfg, cache=str(Path(cfg.cache).resolve()), model=model)


def _resumed_settings(settings: TuneSettings, path: Path) -> TuneSettings:
    """The saved settings of the search being resumed (its space, trials and scoring)."""
    saved = settings_from_json(json.loads(path.read_text()))
    differ = [
        f.name
        for f in dataclasses.fields(TuneSettings)
        if f.name != "train" and getattr(saved, f.name) != getattr(settings, f.name)
    ]
    new, old = _absolute_paths(settings.train), saved.train
    differ += [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name != "base_schedules" and getattr(new, f.name) != getattr(old, f.name)
    ]
    if differ:
        print(f"resuming with the saved settings; ignoring the new {', '.join(differ)}")
    return saved


def settings_from_json(data: dict) -> TuneSettings:
    """``tune.json`` back to ``TuneSettings``."""
    data = dict(data)
    data["train"] = config_from_json(data["train"])
    if data.get("target_budgets") is not None:
        data["target_budgets"] = tuple(data["target_budgets"])
    return TuneSettings(**data)


class ProgressLines(Callback):
    """One line per trial result, start, finish and failure."""

    def on_trial_start(self, iteration, trials, trial, **info):
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        print(f"{trial.trial_id} start | {params}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        line = progress_line(result, result["training_iteration"])  # rldiff.rl.loop's line
        print(f"{trial.trial_id} {line}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        print(f"{trial.trial_id} done at iteration {last.get('training_iteration')}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{trial.trial_id} failed: see {trial.path}/error.txt", flush=True)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def add_arguments(parser) -> None:
    """The ``rldiff tune`` flags: a preset, then overrides of its settings (unset: the preset's)."""
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="output directory of the search")
    run.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="see docs/tune.md")
    run.add_argument("--resume", action="store_true", help="continue an interrupted search")
    run.add_argument("--dashboard", action="store_true", help="start the Ray dashboard too")
    title = "search (overrides of the preset)"
    add_flags(parser, TuneSettings, title=title, overrides=True)
    add_flags(parser, TrainConfig, title="every trial", only=TUNE_TRAIN_FLAGS, overrides=True)


def settings_from_args(args) -> TuneSettings:
    """The preset with the flags that were given."""
    settings = from_flags(TuneSettings, args, base=PRESETS[args.preset]())
    settings.train = from_flags(TrainConfig, args, base=settings.train)
    storage = settings.storage_path
    if storage and "://" not in storage:
        settings.storage_path = str(Path(storage).resolve())
    return settings


def run(args) -> int:
    """``rldiff tune``: 0 when the search finished, 130 when it was interrupted (resumable)."""
    summary = run_tune(
        settings_from_args(args), args.out, resume=args.resume, dashboard=args.dashboard
    )
    if summary["status"] == "interrupted":
        print(f"resume with: rldiff tune --out {args.out} --resume")
        return 130
    print(f"trials: {args.out / 'trials.csv'} ({summary['finished']}/{summary['trials']} finished)")
    if summary.get("winner_dir"):
        print(f"winner: {summary['winner_dir']}")
        print(f"report: {Path(summary['winner_dir']) / 'evaluation' / 'report.md'}")
    return 0
