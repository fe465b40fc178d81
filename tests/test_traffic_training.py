"""Learning from traffic: the traffic log read back as a condition distribution (and refused
clearly where training cannot use it), the env drawing from it, fine-tuning from an exported
policy's weights, and a tiny ``rldiff train --conditions-from --init-policy`` run with its
old-against-new report on held-out seeds."""

import collections
import dataclasses
import datetime
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rldiff.cli import main
from rldiff.config import SearchConfig
from rldiff.data.traffic import TRAFFIC_SCHEMA, read_traffic, traffic_conditions
from rldiff.rl.train import run_training

EVAL_OVERRIDES = {  # a small protocol: the plumbing, not the numbers
    "n_train": 16,
    "search": SearchConfig(rounds=1),
    "solvers": ("unipc",),
    "schedules": ("karras",),
    "global_solvers": ("unipc",),
    "oracle_rounds": 0,
    "bandit_rounds": 0,
    "ray": "off",
}


def request(guidance, budget, labels, model="gmm", seed0=0) -> dict:
    """One traffic log row as the service writes it (``TRAFFIC_SCHEMA``)."""
    n = len(labels)
    return {
        "time": datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC),
        "route": "/v1/generate",
        "requested_policy": "learned",
        "policy": "moe",
        "model": model,
        "guidance": float(guidance),
        "budget": budget,
        "seeds": list(range(seed0, seed0 + n)),
        "labels": list(labels),
        "nfe": [budget] * n,
        "sigmas": [[80.0, 1.0, 0.0]] * n,
        "experts": [["unipc", "unipc"]] * n,
        "latency_ms": 5.0,
    }


def write_log(directory, rows: list[dict], name="traffic-20261201T000000000000Z-a-1-000000"):
    """A traffic log file of ``rows`` under ``directory``, as the service's writer leaves it."""
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRAFFIC_SCHEMA), directory / f"{name}.parquet")
    return directory


SKEWED = [  # 60 % of the samples at guidance 7.5 and budget 4, class 3 or unconditional
    request(7.5, 4, [3, 3, 3]),
    request(7.5, 4, [-1, -1, -1]),
    request(1.0, 6, [5, 5]),
    request(2.0, 4, [0, 1]),
]


def test_the_log_becomes_a_condition_distribution(tmp_path):
    log = write_log(tmp_path / "log" / "host-a", SKEWED[:2])
    write_log(tmp_path / "log" / "host-b", SKEWED[2:], name="traffic-20261201T000001000000Z-b")
    (tmp_path / "log" / ".traffic-being-written.parquet.tmp").write_bytes(b"partial")
    assert log.parent == tmp_path / "log" and read_traffic(tmp_path / "log").num_rows == 4
    found = traffic_conditions(tmp_path / "log", "gmm", budgets=(4, 6), guidance_range=(1, 7.5))
    assert found.requests == 4 and found.samples == 10
    assert found.counts == {(7.5, 4, 3): 3, (7.5, 4, -1): 3, (1.0, 6, 5): 2, (2.0, 4, 0): 1,
                            (2.0, 4, 1): 1}  # fmt: skip
    entries = found.entries()
    assert math.isclose(sum(w for *_, w in entries), 1.0) and [2.0, 4, 0, 0.1] in entries
    assert found.by_guidance_budget()[(7.5, 4)] == pytest.approx(0.6)
    json.dumps(entries)  # the env_config must stay JSON-able


@pytest.mark.parametrize(
    "rows, kwargs, error, message",
    [
        (None, {}, FileNotFoundError, "does not exist"),
        ([], {}, FileNotFoundError, "holds no *.parquet file"),
        ([[]], {}, ValueError, "holds no request"),
        ([[request(2.0, 4, [1]), request(2.0, 4, [1], model="embedded")]], {}, ValueError,
         "another model than gmm: embedded (1)"),
        ([[request(2.0, 7, [1])]], {"budgets": (4, 6)}, ValueError,
         "budgets [7] (training supports [4, 6])"),
        ([[request(9.0, 4, [1])]], {"guidance_range": (1.0, 7.5)}, ValueError,
         "guidance [9.0] (training supports 1..7.5)"),
        ([[request(2.0, 4, [12])]], {"num_classes": 10}, ValueError, "labels [12]"),
    ],
)  # fmt: skip
def test_unusable_logs_are_refused_clearly(tmp_path, rows, kwargs, error, message):
    directory = tmp_path / "log"
    if rows is not None:
        directory.mkdir()
        for i, part in enumerate(rows):
            write_log(directory, part, name=f"traffic-{i}")
    with pytest.raises(error) as info:
        traffic_conditions(directory, "gmm", **kwargs)
    assert message in str(info.value)


def test_the_env_draws_the_logged_mix(tmp_path, tiny_train_config):
    """Each sample's (guidance, budget, label) follows the log's weights (within 4 standard
    errors over 2,560 draws), classes come from the seeds and unconditional samples are scored
    against unconditional references."""
    from rldiff.data.models import load_model
    from rldiff.data.traffic import unconditional_bank
    from rldiff.rl.env import RoutingEnv

    found = traffic_conditions(write_log(tmp_path / "log", SKEWED), "gmm")
    cfg = tiny_train_config(str(tmp_path / "cache"), batch_size=64, conditions=found.entries())
    env = RoutingEnv(cfg.env_config())
    drawn = collections.Counter()
    for _ in range(40):
        env.reset()
        labels = env.cond.labels.tolist()
        for seed, label in zip(env.seeds, labels, strict=True):
            assert label == -1 or label == seed % 10
        triples = zip(env.cond.guidance.tolist(), env.budget.tolist(), labels, strict=True)
        drawn.update(triples)
    n = sum(drawn.values())
    for (g, b, label), count in found.counts.items():
        p = count / found.samples
        assert abs(drawn[(g, b, label)] / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert set(drawn) == set(found.counts)
    uncond = (env.cond.labels == -1).nonzero().squeeze(1)
    bank = unconditional_bank(cfg.cache, load_model("gmm"), "train", list(range(24)), 7.5, 60)
    for i in uncond.tolist():
        assert torch.equal(env.reference[i], bank.x0[env.seeds[i]])


@pytest.fixture(scope="module")
def base(ray_local, tmp_path_factory, tiny_train_config):
    """A base policy trained on the default mix (one iteration), and its cache."""
    cache = str(tmp_path_factory.mktemp("traffic-cache"))
    out = tmp_path_factory.mktemp("base")
    cfg = tiny_train_config(cache, iterations=1)
    run_training(cfg, out, evaluate=False, eval_overrides=EVAL_OVERRIDES)
    return out / "policy", cfg


def test_fine_tuning_starts_from_the_exported_weights(base):
    """Every module of a fine-tuning run starts (learner and env runner) with the exported actor
    weights: the same outputs, bit for bit, as the exported networks."""
    from rldiff.baselines.learned import LearnedPolicy
    from rldiff.data.models import load_model
    from rldiff.rl.algo import build_config
    from rldiff.rl.export import policy_net_from_module
    from rldiff.rl.train import fine_tune_config

    policy, cfg = base
    old = LearnedPolicy.load(policy)
    tuned = fine_tune_config(dataclasses.replace(cfg, init_policy=str(policy)), load_model("gmm"))
    assert (
        tuned.base_schedules
        == json.loads((policy / "policy.json").read_text())["base_schedule"]["schedules"]
    )
    algo = build_config(tuned).build_algo()
    try:
        x = torch.randn(64, old.router.spec.obs_dim, generator=torch.Generator().manual_seed(1))
        nets = {"router": old.router} | {f"expert_{k}": n for k, n in old.expert_modules.items()}
        runner = algo.env_runner.module
        for m, net in nets.items():
            for module in (algo.get_module(m), runner[m]):
                assert torch.equal(policy_net_from_module(module)(x), net(x)), m
    finally:
        algo.stop()


def test_fine_tuning_refuses_a_policy_of_another_model(base, tmp_path, capsys):
    policy, cfg = base
    log = write_log(tmp_path / "log", SKEWED)
    argv = ["train", "--out", str(tmp_path / "run"), "--model", "embedded", "--init-policy",
            str(policy), "--conditions-from", str(log), "--cache", cfg.cache, "--no-evaluate"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trained on another model (gmm) than embedded" in err and "Traceback" not in err


def test_fine_tune_on_traffic_and_compare_old_and_new(base, tmp_path):
    """``conditions_from`` + ``init_policy``: the run trains on the log's conditions from the old
    policy, and its report puts old and new side by side on held-out seeds under that mix."""
    policy, cfg = base
    log = write_log(tmp_path / "log", SKEWED)
    tuned = dataclasses.replace(cfg, conditions_from=str(log), init_policy=str(policy))
    out = tmp_path / "run"
    summary = run_training(tuned, out, eval_samples=40, eval_overrides=EVAL_OVERRIDES)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["init_policy"] == str(policy.resolve()) and len(saved["conditions"]) == 5
    result = json.loads((out / "evaluation" / "traffic.json").read_text())
    assert {(c["guidance"], c["budget"]) for c in result["cells"]} == {(1.0, 6), (2.0, 4), (7.5, 4)}
    assert set(result["rmse"]) == {"new", "old", "table"}
    cell = next(c for c in result["cells"] if c["guidance"] == 7.5)
    assert cell["share"] == pytest.approx(0.6) and cell["nfe"]["new"] <= 4
    pooled = sum(c["share"] * c["rmse"]["new"] for c in result["cells"])
    assert result["rmse"]["new"] == pytest.approx(pooled)
    assert result["ratios"]["new/old"] == pytest.approx(
        result["rmse"]["new"] / result["rmse"]["old"]
    )
    assert summary["traffic"]["ratios"] == result["ratios"]
    report = (out / "evaluation" / "report.md").read_text()
    assert "## Under the logged traffic's conditions" in report and "| 7.5 | 4 | 60.0% |" in report
    rows = [r for r in _pooled(out) if r["family"] == "learned"]
    assert {r["policy"] for r in rows} == {"moe", "initial"}  # both on the protocol's mix too
    from rldiff.data.models import load_model
    from rldiff.serving.catalog import Catalog

    catalog = Catalog("gmm", load_model("gmm"), tmp_path)
    assert catalog.swap("run/policy"), catalog.last_swap  # what a hot swap loads: accepted


def _pooled(out):
    from rldiff.evaluation.ratios import pooled_rows

    return pooled_rows(out / "evaluation")


def test_an_identical_policy_scores_ratio_one(base, tmp_path):
    """The comparison itself: a policy against itself is 1.0 in every cell (same seeds, same
    noise, deterministic sampling)."""
    from rldiff.baselines.specs import PolicySpec
    from rldiff.data.models import load_model
    from rldiff.evaluation.traffic import NEW, OLD, compare_on_traffic
    from rldiff.rl.train import evaluation_config

    policy, cfg = base
    ev = evaluation_config(cfg, tmp_path, 40, EVAL_OVERRIDES)
    found = traffic_conditions(write_log(tmp_path / "log", SKEWED), "gmm")
    spec = PolicySpec(NEW, "learned", "router", 0, path=str(policy))
    specs = {NEW: spec, OLD: dataclasses.replace(spec, name=OLD)}
    result = compare_on_traffic(ev, load_model("gmm"), found.entries(), specs)
    assert result["ratios"]["new/old"] == 1.0
    assert all(np.isclose(c["ratios"]["new/old"], 1.0) for c in result["cells"])


def test_serve_log_fine_tune_evaluate_swap_serve_again(base, tmp_path):
    """The whole loop at tiny sizes: the service logs its traffic, training fine-tunes the served
    policy on the logged conditions and compares old and new, the service swaps to the new policy
    by a redeploy that changes only the policy, and serves it."""
    import socket
    import time

    import requests
    from ray import serve

    from rldiff.serving.app import build_app

    policy, cfg = base
    root, log = policy.parent.parent, tmp_path / "log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    args = {
        "model": "gmm",
        "policy": f"{policy.parent.name}/policy",
        "policy_root": str(root),
        "access_log": False,
        "traffic_log": str(log),
        "traffic_log_flush_s": 0.2,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="loop", route_prefix="/")
        http = requests.Session()
        bodies = [{"seeds": [100 + i], "labels": 3, "guidance": 7.5, "budget": 4} for i in range(4)]
        bodies.append({"seeds": [200], "labels": 5, "guidance": 1.0, "budget": 6})
        for body in bodies:
            answer = http.post(url + "/v1/generate", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 15
        while read_traffic(log).num_rows < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_traffic(log).num_rows == len(bodies)

        out = root / "loop-tuned"
        tuned = dataclasses.replace(cfg, conditions_from=str(log), init_policy=str(policy))
        run_training(tuned, out, eval_samples=24, eval_overrides=EVAL_OVERRIDES)
        result = json.loads((out / "evaluation" / "traffic.json").read_text())
        cell = next(c for c in result["cells"] if (c["guidance"], c["budget"]) == (7.5, 4))
        assert cell["share"] == pytest.approx(0.8) and result["ratios"]["new/old"] > 0

        serve.run(build_app({**args, "policy": "loop-tuned/policy"}), name="loop", route_prefix="/")
        info = http.get(url + "/v1/policy", timeout=30).json()
        assert info["learned"]["directory"] == "loop-tuned/policy" and info["last_swap"]["ok"]
        answer = http.post(url + "/v1/generate", json=bodies[0], timeout=60)
        assert answer.status_code == 200 and answer.json()["samples"][0]["nfe"] <= 4
        assert not answer.json()["degraded"]
    finally:
        serve.shutdown()
