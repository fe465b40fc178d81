"""The evaluation job end to end on the exact mixture model, at a tiny size."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from rldiff.baselines.global_schedule import optimise_schedule
from rldiff.cli import main
from rldiff.config import GLOBAL_SOLVERS, GUIDANCE_MIX, EvaluateConfig, SearchConfig
from rldiff.core.policies import fixed_policy
from rldiff.core.sampler import sample
from rldiff.core.seeds import initial_noise
from rldiff.evaluation.protocol import EVAL_SEED_OFFSET, policy_specs
from rldiff.evaluation.ratios import POOLED, load_rows, pooled_rows

REQUIRED_COLUMNS = {
    "policy", "budget", "mean_nfe", "max_nfe", "rmse_mean", "rmse_p90", "fd", "confidence",
    "seconds_per_sample", "n_samples", "guidance", "usage_by_step",
}  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    argv = ["evaluate", "--model", "gmm", "--samples", "40", "--train-samples", "20",
            "--budgets", "4,6", "--reference-steps", "60", "--search-rounds", "1",
            "--bandit-rounds", "2", "--out", str(out), "--cache", str(out / "cache"), "--ray", "off"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_outputs_exist_and_results_have_the_protocol_columns(evaluated):
    table = pq.read_table(evaluated / "results.parquet")
    assert set(table.column_names) >= REQUIRED_COLUMNS
    rows = pooled_rows(evaluated)
    budgets = {r["budget"] for r in rows}
    assert budgets == {4, 6}
    for r in rows:
        assert r["max_nfe"] <= r["budget"] and r["mean_nfe"] <= r["budget"]
        assert r["n_samples"] == 40
        assert 0 <= r["confidence"] <= 1
    names = {r["policy"] for r in rows}
    assert {"fixed:unipc/karras", "global:dpmpp-2m", "adaptive:dpmpp-2m"} <= names
    for f in ("report.md", "pareto.png", "grid_nfe4.png", "grid_nfe6.png", "config.json"):
        assert (evaluated / f).stat().st_size > 0


def test_bandit_router_is_scored_at_every_budget(evaluated):
    """Protocol policy 4: the epsilon-greedy bandit, trained on the training seeds, saved."""
    rows = pooled_rows(evaluated)
    bandit = {r["budget"]: r for r in rows if r["policy"] == "bandit"}
    assert sorted(bandit) == [4, 6]
    for budget, r in bandit.items():
        assert r["family"] == "bandit" and r["max_nfe"] <= budget and r["n_samples"] == 40
    saved = json.loads((evaluated / "bandit.json").read_text())
    assert saved["budgets"] == [4, 6] and torch.tensor(saved["counts"]).sum() > 0
    assert "`bandit`" in (evaluated / "report.md").read_text()


def test_report_states_floors_and_best_per_budget(evaluated):
    report = (evaluated / "report.md").read_text()
    assert "Floors" in report and "FD" in report
    assert "| 4 | hand-built |" in report and "| 6 | global |" in report


def test_global_schedule_never_worse_than_its_start_on_training_seeds(evaluated):
    cache = json.loads((evaluated / "cache" / "global-schedules.json").read_text())
    assert cache
    for entry in cache.values():
        assert entry["train_rmse"] <= entry["start_rmse"]
        sigmas = entry["sigmas"]
        assert sigmas[-1] == 0 and all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False))


def test_cached_references_and_schedules_are_reused(evaluated, monkeypatch):
    import rldiff.evaluation.protocol as ev

    def fail(*args, **kwargs):
        raise AssertionError("the global schedule search ran again despite the cache")

    monkeypatch.setattr(ev, "optimise_schedule", fail)
    argv = ["evaluate", "--model", "gmm", "--samples", "40", "--train-samples", "20",
            "--budgets", "4,6", "--reference-steps", "60", "--search-rounds", "1",
            "--solvers", "euler", "--schedules", "karras", "--bandit-rounds", "1",
            "--out", str(evaluated / "again"), "--cache", str(evaluated / "cache"), "--ray", "off"]  # fmt: skip
    assert main(argv) == 0


def test_evaluation_seeds_are_disjoint_from_optimisation_seeds(evaluated):
    """The banks the run built: held-out seeds from EVAL_SEED_OFFSET, optimisation seeds below."""
    from rldiff.data.reference import load_reference

    banks = {
        p.name.split("-")[2]: load_reference(p) for p in (evaluated / "cache").glob("*.parquet")
    }
    held_out, train = set(banks["eval"].seeds.tolist()), set(banks["train"].seeds.tolist())
    assert len(held_out) == 40 and len(train) == 20 and not held_out & train
    assert min(held_out) == EVAL_SEED_OFFSET and max(train) < EVAL_SEED_OFFSET


def test_optimised_schedule_improves_a_poor_start(small_gmm):
    from rldiff.core.denoisers import Condition

    noise = initial_noise(range(16), (4,), torch.float64)
    cond = Condition.make(-1, 1.0, batch=16)
    ref = sample(
        small_gmm,
        fixed_policy("unipc", "logsnr-uniform", 300, small_gmm.noise_table),
        noise,
        cond,
        300,
    ).x0
    found = optimise_schedule(small_gmm, "euler", 4, noise, cond, ref, SearchConfig(rounds=2))
    assert found.train_rmse < found.start_rmse
    assert float(found.sigmas[0]) == pytest.approx(small_gmm.noise_table.sigma_max)
    assert found.sigmas[-1] == 0


def test_policy_specs_cover_every_solver_schedule_and_budget():
    cfg = EvaluateConfig(budgets=(3, 5))
    schedules = {(s, b): torch.tensor([1.0, 0.0]) for s in cfg.global_solvers for b in cfg.budgets}
    specs = policy_specs(cfg, schedules)
    hand = [s for s in specs if s.family == "hand-built"]
    assert len(hand) == len(cfg.solvers) * len(cfg.schedules) * 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--budgets", "0"], "integer >= 1"),
        (["evaluate", "--solvers", "rk4"], "unknown"),
        (["evaluate", "--samples", "many"], "integer >= 1"),
    ],
)
def test_bad_arguments_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    code = main(["evaluate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                 "--ray", "off"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_baseline_scores_are_cached_and_rerun_identically(evaluated, tmp_path, capsys):
    """A second run with the same protocol reads the deterministic baselines from the cache and
    writes the same rows; a damaged cache entry is recomputed."""
    entries = sorted((evaluated / "cache" / "scores").glob("*.pt"))
    assert len(entries) > 10  # hand-built, global, adaptive and the model check; not the bandit
    entries[0].write_bytes(b"damaged")
    argv = ["evaluate", "--model", "gmm", "--samples", "40", "--train-samples", "20",
            "--budgets", "4,6", "--reference-steps", "60", "--search-rounds", "1",
            "--bandit-rounds", "2", "--out", str(tmp_path), "--cache", str(evaluated / "cache"),
            "--ray", "off"]  # fmt: skip
    assert main(argv) == 0
    # the bandit and the table (2 budgets each) are always scored afresh
    assert f"{len(entries) - 1} of {len(entries) + 4} scores from" in capsys.readouterr().out
    first = pq.read_table(evaluated / "results.parquet").to_pylist()
    again = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [r["policy"] for r in again] == [r["policy"] for r in first]
    for a, b in zip(first, again, strict=True):
        keys = {"rmse_mean", "fd", "mean_nfe"} if a["family"] != "bandit" else {"mean_nfe"}
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-9)


def test_the_condition_mix_pooled_and_per_guidance_rows(evaluated):
    """One row per (policy, budget, guidance) and a pooled row (guidance NaN) that weighs every
    scale the same; the held-out samples split evenly over the mix."""
    rows = load_rows(evaluated)
    pooled = {(r["policy"], r["budget"]): r for r in rows if r["guidance"] == POOLED}
    per = [r for r in rows if r["guidance"] != POOLED]
    assert {r["guidance"] for r in per} == set(GUIDANCE_MIX)
    assert {"table", "oracle"} <= {p for p, _ in pooled}
    for (policy, budget), r in pooled.items():
        mine = [p for p in per if (p["policy"], p["budget"]) == (policy, budget)]
        assert sorted(p["guidance"] for p in mine) == sorted(GUIDANCE_MIX)
        assert [p["n_samples"] for p in mine] == [10] * 4 and r["n_samples"] == 40
        assert r["rmse_mean"] == pytest.approx(sum(p["rmse_mean"] for p in mine) / 4, rel=1e-12)


def test_table_is_the_best_own_schedule_and_the_oracle_bounds_it(evaluated):
    """The table picks, per (budget, guidance), the solver whose schedule optimised on that
    guidance's training seeds had the lowest training RMSE; the oracle (the best table candidate
    per held-out sample, then refined) is never worse than the table on any group."""
    schedules = json.loads((evaluated / "cache" / "global-schedules.json").read_text())
    table = json.loads((evaluated / "table.json").read_text())
    assert {(e["budget"], e["guidance"]) for e in table} == {
        (b, g) for b in (4, 6) for g in GUIDANCE_MIX
    }
    for e in table:
        tag = f"|{e['budget']}|g{e['guidance']:g}"
        mine = {k.split("|")[1]: v["train_rmse"] for k, v in schedules.items() if k.endswith(tag)}
        assert sorted(mine) == sorted(GLOBAL_SOLVERS)
        assert e["solver"] == min(mine, key=mine.get)
    rows = load_rows(evaluated)
    rmse = {(r["policy"], r["budget"], r["guidance"]): r["rmse_mean"] for r in rows}
    for (policy, budget, guidance), value in rmse.items():
        if policy == "oracle":
            assert value <= rmse[("table", budget, guidance)] + 1e-9


def test_ratios_command_prints_the_judging_ratios(evaluated, capsys):
    assert main(["ratios", str(evaluated), "--budgets", "4,6"]) == 0
    out = capsys.readouterr().out
    assert "oracle / table" in out and "| 4 | all |" in out and "| 6 | 7.5 |" in out
    assert main(["ratios", str(evaluated / "nowhere")]) == 2
    assert "no results.parquet" in capsys.readouterr().err
