"""The Tune search end to end on the exact mixture model at a tiny size: an interrupted search
resumed to completion, the trial table and plot, TensorBoard files per trial, the winner picked on
held-out seeds and loadable without Ray; and the pieces (trial configs, tie-break, concurrency)."""

import argparse
import json
import os
import signal

import pandas as pd
import pytest
from ray import tune

from rldiff.baselines.learned import LearnedPolicy
from rldiff.config import SearchConfig, TrainConfig
from rldiff.rl.algo import build_config
from rldiff.search.report import choose_winner
from rldiff.search.tune import (
    PRESETS,
    TuneSettings,
    add_arguments,
    concurrency,
    run_tune,
    search_space,
    settings_from_args,
    trial_config,
)

BUDGETS = (4, 6)
SPACE = {
    "lr": ["loguniform", 1e-4, 1e-3],
    "hidden": ["choice", ["16x16", "32x32"]],
    "experts": ["choice", ["all", "unipc,euler"]],
}
EVAL_OVERRIDES = {  # a small protocol: the point here is the plumbing, not the numbers
    "n_train": 16,
    "search": SearchConfig(rounds=1),
    "solvers": ("unipc",),
    "schedules": ("karras",),
    "global_solvers": ("unipc",),
    "bandit_rounds": 0,
    "ray": "off",  # scoring in-process: faster than Ray tasks at this size
}


class InterruptOnce(tune.Callback):
    """Sends this process SIGINT (Ctrl+C) once the first checkpoint is registered (a Ctrl+C
    between a result and its checkpoint's registration loses that checkpoint, and the trial
    repeats the iteration). The flag is on the class: Tune pickles its callbacks with the
    experiment, and the restored copy must not interrupt the resumed search again."""

    fired = False
    trial_id = None  # the trial whose checkpoint was the last one before the interruption

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not InterruptOnce.fired:
            InterruptOnce.fired, InterruptOnce.trial_id = True, trial.trial_id
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory, tiny_train_config):
    """Two trials of two iterations, about a second each, in the trial's own process."""
    train = tiny_train_config(str(tmp_path_factory.mktemp("tune-cache")), budgets=BUDGETS)
    return TuneSettings(
        preset="test",
        train=train,
        space=SPACE,
        num_samples=2,
        grace_period=2,  # no ASHA rung below the last iteration: both trials complete
        select_samples=16,
        eval_samples=16,
    )


@pytest.fixture(scope="module")
def searched(ray_local, tiny_settings, tmp_path_factory):
    """A search interrupted at its first result, then resumed to the end."""
    out = tmp_path_factory.mktemp("tune")
    kwargs = {"eval_overrides": EVAL_OVERRIDES}
    first = run_tune(tiny_settings, out, callbacks=[InterruptOnce()], **kwargs)
    resumed = run_tune(tiny_settings, out, resume=True, **kwargs)
    return out, first, resumed


def test_an_interrupted_search_resumes_and_completes(searched):
    out, first, resumed = searched
    assert InterruptOnce.fired
    assert first["status"] == "interrupted" and first["finished"] < 2
    assert resumed["status"] == "done" and resumed["trials"] == resumed["finished"] == 2
    trials = sorted((out / "search").glob("trial_*"))
    assert f"trial_{InterruptOnce.trial_id}" in [t.name for t in trials]
    for trial in trials:
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert rows[-1]["training_iteration"] == 2
        if trial.name == f"trial_{InterruptOnce.trial_id}":
            # Resumed from its checkpoint, not restarted: no iteration twice, and iteration 2
            # carries on iteration 1's counters. (Another trial may have been caught between a
            # result and its checkpoint: that one repeats the iteration.)
            assert [r["training_iteration"] for r in rows] == [1, 2]
            assert rows[1]["charts/env_steps"] == 2 * rows[0]["charts/env_steps"]


def test_trial_table_plot_and_tensorboard_per_trial(searched, event_tags):
    out, _, resumed = searched
    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 2 and list(table["status"]) == ["completed", "completed"]
    assert set(table["hidden"]) <= {"16x16", "32x32"} and (table["iterations"] == 2).all()
    assert table["heldout/score"].notna().all() and table["winner"].sum() == 1
    assert table["heldout/score"].is_monotonic_increasing  # best first
    assert {f"heldout/rmse@{b}" for b in BUDGETS} <= set(table.columns)
    assert len(pd.read_csv(out / "trials.csv")) == 2
    assert (out / "trials.png").stat().st_size > 0
    trials = sorted((out / "search").glob("trial_*"))
    assert len(trials) == 2
    for trial in trials:
        tags = event_tags(trial)
        assert sorted(set(tags["ray/tune/charts/rmse_vs_base"])) == [1, 2]
        assert "ray/tune/charts/seconds_per_iteration" in tags
        assert any(t.startswith("ray/tune/losses/") for t in tags)


def test_winner_is_picked_on_held_out_seeds_and_loads_without_ray(searched, tiny_settings):
    out, _, resumed = searched
    table = pd.read_parquet(out / "trials.parquet")
    best = table[table["winner"]].iloc[0]
    assert resumed["winner"] == best["trial_id"] == table.iloc[0]["trial_id"]
    winner = out / "winner"
    policy = LearnedPolicy.load(winner / "policy")
    expected = trial_config(tiny_settings.train, {k: best[k] for k in SPACE})
    assert policy.spec["training"]["config"]["hidden"] == list(expected.hidden)
    saved = json.loads((winner / "train_config.json").read_text())
    assert saved["lr"] == pytest.approx(best["lr"]) and saved["base_schedules"]
    trial = json.loads((winner / "trial.json").read_text())
    assert trial["trial_id"] == best["trial_id"] and trial["picked_by"]["target_budgets"] == [4, 6]
    report = (winner / "evaluation" / "report.md").read_text()
    assert "| learned | `moe` |" in report
    assert not (out / "winner.tmp").exists()


def test_a_new_search_never_mixes_with_an_old_one(searched, tiny_settings):
    out, _, _ = searched
    with pytest.raises(ValueError, match="holds a search already"):
        run_tune(tiny_settings, out)


def test_trial_config_reads_the_search_parameters():
    base = TrainConfig()
    cfg = trial_config(base, {"hidden": "128x64", "experts": "unipc,heun", "lr": 1e-3})
    assert cfg.hidden == (128, 64) and cfg.experts == ("unipc", "heun") and cfg.lr == 1e-3
    assert trial_config(base, {"experts": "all"}).experts is None
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        trial_config(base, {"learning_rate": 1e-3})
    with pytest.raises(ValueError):
        trial_config(base, {"experts": "unipc,rk4"})
    with pytest.raises(ValueError, match="unknown kind"):
        search_space({"lr": ["normal", 0, 1]})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_space_makes_valid_trial_configs(preset):
    settings = PRESETS[preset]()
    space = search_space(settings.space)
    for i in range(20):
        params = {k: v.sample() if hasattr(v, "sample") else v for k, v in space.items()}
        cfg = trial_config(settings.train, params)
        for key, value in settings.space.items():  # every sampled value lands, in its range
            applied = getattr(cfg, key)
            if key == "hidden":
                assert "x".join(map(str, applied)) == params[key], (i, params)
            elif key == "experts":
                assert applied == (None if params[key] == "all" else tuple(params[key].split(",")))
            elif value[0] in ("uniform", "loguniform"):
                assert value[1] <= applied <= value[2] and applied == params[key], (i, key)
            elif value[0] == "choice":
                assert applied in value[1], (i, key)
            else:
                assert applied == params[key], (i, key)
    build_config(cfg)  # RLlib accepts the last one (no Ray needed to build the config object)


def test_ties_on_quality_go_to_the_fewest_nfe():
    rows = [
        {"trial_id": "a", "heldout/score": 0.900, "heldout/mean_nfe": 6.0},
        {"trial_id": "b", "heldout/score": 0.905, "heldout/mean_nfe": 5.5},  # within 1 %: tied
        {"trial_id": "c", "heldout/score": 0.950, "heldout/mean_nfe": 4.0},  # worse: not tied
        {"trial_id": "d", "status": "error"},
    ]
    assert choose_winner(rows, tolerance=0.01)["trial_id"] == "b"
    assert choose_winner(rows, tolerance=0.0)["trial_id"] == "a"
    assert choose_winner(rows[3:], tolerance=0.01) is None


def test_concurrency_follows_the_cluster_resources():
    cpu_only = [{"CPU": 1}, {"CPU": 1}, {"CPU": 1}]  # a trial with two env runners
    assert concurrency(cpu_only, {"CPU": 16}, num_samples=32) == 5
    assert concurrency(cpu_only, {"CPU": 2}, num_samples=32) == 1  # never 0
    assert concurrency([{"CPU": 1}], {"CPU": 2}, num_samples=8) == 2
    assert concurrency([{"CPU": 1}], {"CPU": 64}, num_samples=8) == 8
    gpu = [{"CPU": 1}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert concurrency(gpu, {"CPU": 64, "GPU": 4}, num_samples=32) == 2


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_the_preset(tmp_path):
    args = parse(["--out", "o", "--samples", "4", "--iterations", "6", "--storage-path", "st"])
    settings = settings_from_args(args)
    assert settings.num_samples == 4 and settings.train.iterations == 6
    assert settings.train.model == "gmm" and settings.space == PRESETS["quick"]().space
    assert os.path.isabs(settings.storage_path)
    full = settings_from_args(parse(["--out", "o", "--preset", "full"]))
    assert full.train.model == "embedded" and full.train.env_runners == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "2"], "--out"),
        (["--out", "o", "--preset", "huge"], "invalid choice"),
        (["--out", "o", "--samples", "0"], "integer >= 1"),
        (["--out", "o", "--target-budgets", "4,x"], "integer >= 1"),
    ],
)
def test_bad_tune_arguments_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_target_budgets_must_be_trained_budgets(tiny_settings, tmp_path):
    import dataclasses

    settings = dataclasses.replace(tiny_settings, target_budgets=(3,))
    with pytest.raises(ValueError, match="not training budgets"):
        run_tune(settings, tmp_path / "o")


def test_missing_model_is_a_clear_error_before_ray_starts(tmp_path):
    from rldiff.search.tune import run

    args = parse(["--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(args)


@pytest.mark.slow
def test_a_trial_with_remote_env_runners_fits_its_placement_group(
    ray_local, tiny_settings, tmp_path
):
    """1 CPU for the trial + 1 per env runner: on a 2-CPU Ray the runner only fits inside the
    trial's placement group, so a trained trial shows the runner was placed there (a runner
    left outside would wait forever: the time budget stops the trial with no checkpoint, and
    there is no winner)."""
    import dataclasses

    train = dataclasses.replace(tiny_settings.train, env_runners=1)
    settings = dataclasses.replace(tiny_settings, train=train, num_samples=1, time_budget_s=300)
    summary = run_tune(settings, tmp_path / "o", eval_overrides=EVAL_OVERRIDES)
    assert summary["status"] == "done" and summary["finished"] == 1 and summary["winner"]
