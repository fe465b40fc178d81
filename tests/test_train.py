"""The training job end to end on the exact mixture model at a tiny size: checkpoints, TensorBoard,
resume, the exported policy (same actions as inside RLlib) and its evaluation."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rldiff.algo import warm_start
from rldiff.cli import main
from rldiff.global_schedule import SearchConfig
from rldiff.learned_policy import LearnedPolicy, expert_mean, router_choice
from rldiff.models import load_model
from rldiff.sampler import Sampling, sample
from rldiff.seeds import initial_noise
from rldiff.solvers import EXPERT_NAMES, expert_index
from rldiff.train import run_training

BUDGETS = (4, 6)
EVAL_OVERRIDES = {  # a small protocol: the point here is the plumbing, not the numbers
    "n_train": 16,
    "search": SearchConfig(rounds=1),
    "solvers": ("euler", "unipc"),
    "schedules": ("karras", "logsnr-uniform"),
    "global_solvers": ("unipc",),
    "ray": "off",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_train_config):
    """A TrainConfig that trains in about a second per iteration, in the driver."""
    return tiny_train_config(str(tmp_path_factory.mktemp("train-cache")), budgets=BUDGETS)


@pytest.fixture(scope="module")
def trained(ray_local, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    summary = run_training(
        tiny, out, evaluate=True, eval_samples=16, eval_overrides=EVAL_OVERRIDES, ablations=True
    )
    return out, summary


def test_run_writes_checkpoints_tensorboard_policy_and_evaluation(trained, event_tags):
    out, summary = trained
    assert summary["iteration"] == 2 and summary["iterations_run"] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0001", "iter_0002"]
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in progress] == [1, 2]
    tags = event_tags(out / "tensorboard")
    assert tags["rldiff/rmse_mean"] == [1, 2]
    assert {"losses/router/policy_loss", "losses/expert_2/policy_loss"} <= set(tags)
    assert {f"charts/expert_usage/{n}" for n in EXPERT_NAMES} <= set(tags)

    spec = json.loads((out / "policy" / "policy.json").read_text())
    assert [e["name"] for e in spec["experts"]] == list(EXPERT_NAMES) and spec["router"]
    assert sorted(spec["warm_start"]["schedules"]) == [str(b) for b in BUDGETS]
    assert spec["training"]["iteration"] == 2
    assert (out / "policy" / "modules" / "router").is_dir()
    assert json.loads((out / "train_config.json").read_text())["base_schedules"]

    rows = pq.read_table(out / "evaluation" / "results.parquet").to_pylist()
    learned = [r for r in rows if r["policy"] == "moe"]
    assert sorted(r["budget"] for r in learned) == list(BUDGETS)
    assert all(r["family"] == "learned" and r["max_nfe"] <= r["budget"] for r in learned)
    report = (out / "evaluation" / "report.md").read_text()
    assert all(f"| {b} | `moe` |" in report for b in BUDGETS)  # the learned policies' table
    for name in ("pareto.png", "schedules.png"):
        assert (out / "evaluation" / name).stat().st_size > 0


def test_ablation_ppo_single_is_trained_and_evaluated_beside_moe(trained):
    out, summary = trained
    single = out / "ablations" / "ppo-single"
    assert summary["ablations"]["ppo-single"]["iteration"] == 2
    assert sorted(p.name for p in (single / "checkpoints").iterdir()) == ["iter_0001", "iter_0002"]
    spec = json.loads((single / "policy" / "policy.json").read_text())
    assert spec["router"] is None and [e["name"] for e in spec["experts"]] == ["unipc"]
    config = json.loads((single / "train_config.json").read_text())
    assert config["experts"] == ["unipc"] and config["train_batch_size"] == 32  # half of moe's
    rows = pq.read_table(out / "evaluation" / "results.parquet").to_pylist()
    rows = [r for r in rows if r["policy"] == "ppo-single"]
    assert sorted(r["budget"] for r in rows) == list(BUDGETS)
    assert all(json.loads(r["expert_usage"]) == {"unipc": 1.0} for r in rows)
    report = (out / "evaluation" / "report.md").read_text()
    assert "## Learned policies and the bandit against the baselines" in report
    assert "| `ppo-single` |" in report and "vs best global" in report


def test_resume_continues_at_the_next_iteration(ray_local, tiny, tmp_path, monkeypatch):
    import dataclasses

    import rldiff.train

    monkeypatch.chdir(tmp_path)
    warm_starts = []  # the router warm start runs on a fresh run only, never on resume

    def spy(algo, cfg):
        warm_starts.append(algo.iteration)
        return warm_start(algo, cfg)

    monkeypatch.setattr(rldiff.train, "warm_start", spy)
    out = Path("run")  # relative, as typed on a command line
    kwargs = {"evaluate": False, "eval_overrides": EVAL_OVERRIDES}  # the cached base schedules
    first = run_training(dataclasses.replace(tiny, iterations=1), out, **kwargs)
    assert first["iterations_run"] == [1] and warm_starts == [0]
    shutil.rmtree(out / "policy")  # as if killed after the checkpoint
    resumed = run_training(tiny, out, resume=True, **kwargs)
    assert resumed["iterations_run"] == [2] and resumed["iteration"] == 2
    assert warm_starts == [0]
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in progress] == [1, 2]
    assert progress[1]["env_steps"] > progress[0]["env_steps"]  # the counters carried on
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0001", "iter_0002"]
    policy = json.loads((out / "policy" / "policy.json").read_text())
    assert policy["training"]["iteration"] == 2


def test_a_fresh_run_never_mixes_with_old_checkpoints(trained, tiny):
    out, _ = trained
    with pytest.raises(ValueError, match="holds checkpoints already"):
        run_training(tiny, out)


def observations(policy, budgets, steps: int):
    """Observations of a small batch at its first ``steps`` steps, stepped by ``policy``."""
    denoiser = load_model("gmm")
    seeds = list(range(2_000_000, 2_000_012))
    noise = initial_noise(seeds, (1, 16, 16))
    from rldiff.denoisers import Condition

    batch = Sampling(denoiser, noise, Condition.make([s % 10 for s in seeds]), budgets, seeds)
    for _ in range(steps):
        obs = batch.observe()
        yield obs
        batch.advance(policy.act(obs))


def test_standalone_policy_acts_like_the_modules_inside_the_algorithm(trained):
    from ray.rllib.algorithms.algorithm import Algorithm

    out, summary = trained
    policy = LearnedPolicy.load(out / "policy")
    algo = Algorithm.from_checkpoint(summary["checkpoint"])
    try:
        budgets = torch.tensor([4, 6] * 6)
        for obs in observations(policy, budgets, steps=3):
            x = policy.observe(obs)
            with torch.no_grad():
                choice = router_choice(algo.get_module("router"), x)
                means = {k: expert_mean(algo.get_module(f"expert_{k}"), x) for k in range(5)}
            decision = policy.act(obs)
            assert torch.equal(decision.expert, choice)  # router action j is expert j here
            for k in decision.expert.unique().tolist():
                rows = decision.expert == k
                mine = policy.expert_modules[k]
                with torch.no_grad():
                    torch.testing.assert_close(expert_mean(mine, x[rows]), means[k][rows])
            assert ((decision.confidence >= 1 / 5 - 1e-9) & (decision.confidence <= 1)).all()
    finally:
        algo.stop()


def test_learned_policy_respects_budgets_in_the_sampler(trained):
    out, _ = trained
    policy = LearnedPolicy.load(out / "policy")
    denoiser = load_model("gmm")
    seeds = list(range(3_000_000, 3_000_016))
    budgets = torch.tensor([4, 6] * 8)
    from rldiff.denoisers import Condition

    result = sample(
        denoiser,
        policy,
        initial_noise(seeds, (1, 16, 16)),
        Condition.make([s % 10 for s in seeds]),
        budgets,
        seeds,
    )
    assert (result.nfe <= budgets).all() and torch.isfinite(result.x0).all()
    steps = result.schedule(0)
    assert steps[-1]["sigma_next"] == 0 and "confidence" in steps[0]


def test_single_expert_policy_needs_no_router(trained, tmp_path, monkeypatch):
    out, _ = trained
    shutil.copytree(out / "policy", tmp_path / "policy")
    path = tmp_path / "policy" / "policy.json"
    spec = json.loads(path.read_text())
    spec["router"], spec["experts"] = None, [e for e in spec["experts"] if e["name"] == "unipc"]
    path.write_text(json.dumps(spec))
    monkeypatch.chdir(tmp_path)
    policy = LearnedPolicy.load("policy")  # a relative path, too
    for obs in observations(policy, torch.tensor([6] * 12), steps=2):
        decision = policy.act(obs)
        assert (decision.expert == expert_index("unipc")).all()
        assert (decision.confidence == 1).all()


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported policy"):
        LearnedPolicy.load(tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--iterations", "3"], "--out"),
        (["train", "--out", "x", "--iterations", "0"], "integer >= 1"),
        (["train", "--out", "x", "--budgets", "4,a"], "integer >= 1"),
        (["train", "--out", "x", "--base-expert", "rk4"], "invalid choice"),
        (["train", "--out", "x", "--experts", "euler,rk4"], "unknown"),
        (["train", "--out", "x", "--cost-per-nfe", "-1"], "non-negative"),
        (["train", "--out", "x", "--router-warm-start", "1"], "probability"),
    ],
)
def test_bad_train_arguments_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_a_clear_error_before_ray_starts(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "gpus, runners, learner, per_runner",
    [(0, 2, 0, 0), (2, 2, 0, 1), (3, 2, 1, 1), (1, 2, 0, 0.5), (1, 0, 1, 0)],
)
def test_gpus_go_to_env_runners_first_then_a_learner(
    ray_local, monkeypatch, gpus, runners, learner, per_runner
):
    """Never a GPU the cluster lacks (that hangs); the denoiser's env runners come first."""
    from rldiff.algo import gpus_per_env_runner, learner_resources

    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {"CPU": 8, "GPU": gpus})
    assert gpus_per_env_runner(runners) == per_runner
    assert learner_resources(runners) == {"num_learners": learner, "num_gpus_per_learner": learner}
