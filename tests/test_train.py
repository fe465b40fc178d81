"""The training job end to end on the exact mixture model at a tiny size: checkpoints, TensorBoard,
resume, the exported policy (same actions as inside RLlib, format 1 refused and converted) and its
evaluation."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rldiff.baselines.learned import LearnedPolicy, expert_mean
from rldiff.cli import main
from rldiff.config import SearchConfig
from rldiff.core.routing import decision_from_actions, routed_experts
from rldiff.core.sampler import Sampling, sample
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERT_NAMES, expert_index
from rldiff.data.models import load_model
from rldiff.evaluation.ratios import pooled_rows
from rldiff.rl.train import run_training

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
    assert tags["charts/rmse_mean"] == [1, 2]
    assert {"losses/router/policy_loss", "losses/expert_2/policy_loss"} <= set(tags)
    assert {f"charts/expert_usage/{n}" for n in EXPERT_NAMES} <= set(tags)

    spec = json.loads((out / "policy" / "policy.json").read_text())
    assert [e["name"] for e in spec["experts"]] == list(EXPERT_NAMES) and spec["router"]
    assert sorted({e["budget"] for e in spec["base_schedule"]["schedules"]}) == list(BUDGETS)
    assert spec["training"]["iteration"] == 2
    files = sorted(p.name for p in (out / "policy").iterdir())
    assert files == sorted(["policy.json", *(f"{m}.safetensors" for m in spec["modules"])])
    assert spec["modules"]["router"]["out_dim"] == len(EXPERT_NAMES) and spec["format"] == 2
    assert json.loads((out / "train_config.json").read_text())["base_schedules"]

    rows = pooled_rows(out / "evaluation")
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
    rows = [r for r in pooled_rows(out / "evaluation") if r["policy"] == "ppo-single"]
    assert sorted(r["budget"] for r in rows) == list(BUDGETS)
    assert all(json.loads(r["expert_usage"]) == {"unipc": 1.0} for r in rows)
    report = (out / "evaluation" / "report.md").read_text()
    assert "## Learned policies and the bandit against the baselines" in report
    assert "| `ppo-single` |" in report and "vs best global" in report


def test_resume_continues_at_the_next_iteration(ray_local, tiny, tmp_path, monkeypatch, capsys):
    """A resumed run goes on from its checkpoint's modules (tests/test_warm_start.py: a restore
    loads the trained weights over the modules' warm start), and says so."""
    import dataclasses

    monkeypatch.chdir(tmp_path)
    out = Path("run")  # relative, as typed on a command line
    kwargs = {"evaluate": False, "eval_overrides": EVAL_OVERRIDES}  # the cached base schedules
    first = run_training(dataclasses.replace(tiny, iterations=1), out, **kwargs)
    assert first["iterations_run"] == [1] and "router warm start: " in capsys.readouterr().out
    shutil.rmtree(out / "policy")  # as if killed after the checkpoint
    resumed = run_training(tiny, out, resume=True, **kwargs)
    assert resumed["iterations_run"] == [2] and resumed["iteration"] == 2
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "router warm start" not in printed
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in progress] == [1, 2]
    assert progress[1]["charts/env_steps"] > progress[0]["charts/env_steps"]  # carried on
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
    from rldiff.core.denoisers import Condition

    batch = Sampling(denoiser, noise, Condition.make([s % 10 for s in seeds]), budgets, seeds)
    for _ in range(steps):
        obs = batch.observe()
        yield obs
        batch.advance(policy.act(obs))


def rllib_dist_inputs(module, x: torch.Tensor) -> torch.Tensor:
    """An RLlib module's action distribution inputs for observations ``x``."""
    from ray.rllib.core.columns import Columns

    with torch.no_grad():
        return module.forward_inference({Columns.OBS: x})[Columns.ACTION_DIST_INPUTS]


def rllib_expert_mean(module, x: torch.Tensor) -> torch.Tensor:
    """An RLlib expert module's Gaussian mean, unsquashed to its action bounds and clipped."""
    out = rllib_dist_inputs(module, x)
    mean = out[:, : out.shape[1] // 2]
    low = torch.as_tensor(module.action_space.low, dtype=mean.dtype)
    high = torch.as_tensor(module.action_space.high, dtype=mean.dtype)
    return torch.clamp(low + (mean + 1) * (high - low) / 2, low, high)


def test_standalone_policy_acts_like_the_modules_inside_the_algorithm(trained):
    """Bit for bit: the networks' outputs, the router's choice, the experts' actions and the
    decision the sampler gets."""
    from ray.rllib.algorithms.algorithm import Algorithm

    out, summary = trained
    policy = LearnedPolicy.load(out / "policy")
    algo = Algorithm.from_checkpoint(summary["checkpoint"])
    try:
        budgets = torch.tensor([4, 6] * 6)
        for obs in observations(policy, budgets, steps=3):
            x = policy.observe(obs)
            logits = rllib_dist_inputs(algo.get_module("router"), x)
            with torch.no_grad():
                assert torch.equal(policy.router(x), logits)
            decision = policy.act(obs)
            chosen = routed_experts(obs, logits.argmax(1), policy.experts, policy.base)
            assert torch.equal(decision.expert, chosen)  # action 0: the table's expert
            actions = torch.zeros(len(x), 2, dtype=torch.float64)
            for k in decision.expert.unique().tolist():
                rows = decision.expert == k
                module, mine = algo.get_module(f"expert_{k}"), policy.expert_modules[k]
                with torch.no_grad():
                    assert torch.equal(mine(x[rows]), rllib_dist_inputs(module, x[rows]))
                    assert torch.equal(
                        expert_mean(mine, x[rows]), rllib_expert_mean(module, x[rows])
                    )
                actions[rows] = rllib_expert_mean(module, x[rows]).double()
            theirs = decision_from_actions(obs, decision.expert, actions.numpy(), policy.base)
            assert torch.equal(decision.sigma_next, theirs.sigma_next)
            assert torch.equal(decision.eta, theirs.eta)
            low = 1 / len(EXPERT_NAMES) - 1e-9
            assert ((decision.confidence >= low) & (decision.confidence <= 1)).all()
    finally:
        algo.stop()


def test_a_format_1_directory_is_refused_then_converted(trained, tmp_path):
    """A directory the old export wrote (RLlib module checkpoints under ``modules/``) fails to
    load with the command that converts it; converted, it acts as the fresh export does."""
    from rldiff.rl.export import MODULES_IN_CHECKPOINT, main

    out, summary = trained
    spec = json.loads((out / "policy" / "policy.json").read_text())
    old = tmp_path / "policy"
    for m in spec["modules"]:
        source = Path(summary["checkpoint"]).joinpath(*MODULES_IN_CHECKPOINT, m)
        shutil.copytree(source, old / "modules" / m)
    spec = {k: v for k, v in spec.items() if k != "modules"}
    spec |= {"format": 1, "warm_start": spec.pop("base_schedule")}
    (old / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="format 1") as error:
        LearnedPolicy.load(old)
    assert f"python -m rldiff.rl.export {old}" in str(error.value)
    assert "rldiff train --out RUN --resume --iterations 2 --no-evaluate" in str(error.value)

    assert main([str(old)]) == 0
    assert not (old / "modules").exists()
    converted, fresh = LearnedPolicy.load(old), LearnedPolicy.load(out / "policy")
    assert converted.spec["base_schedule"] == fresh.spec["base_schedule"]
    for obs in observations(fresh, torch.tensor([4, 6] * 6), steps=2):
        a, b = converted.act(obs), fresh.act(obs)
        assert torch.equal(a.expert, b.expert) and torch.equal(a.sigma_next, b.sigma_next)


def test_learned_policy_respects_budgets_in_the_sampler(trained):
    out, _ = trained
    policy = LearnedPolicy.load(out / "policy")
    denoiser = load_model("gmm")
    seeds = list(range(3_000_000, 3_000_016))
    budgets = torch.tensor([4, 6] * 8)
    from rldiff.core.denoisers import Condition

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
    from rldiff.rl.algo import gpus_per_env_runner, learner_resources

    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {"CPU": 8, "GPU": gpus})
    assert gpus_per_env_runner(runners) == per_runner
    assert learner_resources(runners) == {"num_learners": learner, "num_gpus_per_learner": learner}
