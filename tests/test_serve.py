"""The Serve application: request checks, API key, policy root, degradation and explanations
without Ray; then one app on 127.0.0.1 (exact mixture model, an untrained exported policy),
deployed as ``serve deploy`` deploys ``serve/config.yaml``: 401/200, served == sampler, a 500-request
fuzz, batch calls, and a hot swap under load with its failed requests counted."""

import json
import math
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rldiff.baselines.specs import PolicySpec
from rldiff.core.denoisers import Condition
from rldiff.core.sampler import sample
from rldiff.core.schedules import get_schedule
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERT_NAMES, steps_for_budget
from rldiff.data.models import load_model
from rldiff.serving.auth import ApiKey
from rldiff.serving.catalog import Catalog, default_hand_built
from rldiff.serving.engine import check_job, run_jobs
from rldiff.serving.explain import explain
from rldiff.serving.schemas import Limits, RequestProblem, check_batch, check_generate

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (4, 6)
KEY = "k" * 8 + "-test-key-0123"
BODY_TIMEOUT_S = 5.0  # the test service's body_timeout_s


@pytest.fixture(scope="module")
def gmm():
    return load_model("gmm")


@pytest.fixture(scope="module")
def policy_root(tmp_path_factory, gmm):
    """``good/policy`` (untrained, base schedules: logSNR schedules for budgets 4 and 6) with an
    evaluation beside it, ``copy/policy`` (the same policy elsewhere), ``broken/policy``,
    ``other-model/policy`` (trained on another model, as far as its fingerprint says)."""
    from rldiff.rl.untrained import untrained_policy

    root = tmp_path_factory.mktemp("policies")
    schedules = {
        b: get_schedule("logsnr-uniform", steps_for_budget("unipc", b), gmm.noise_table).tolist()
        for b in BUDGETS
    }
    untrained_policy(root / "good" / "policy", "gmm", BUDGETS, schedules)
    rows = [
        {
            "policy": name,
            "family": family,
            "budget": b,
            "guidance": math.nan,
            "rmse_mean": rmse,
            "mean_nfe": float(b),
        }  # fmt: skip
        for b in BUDGETS
        for name, family, rmse in [
            ("fixed:euler/karras", "hand-built", 0.2),
            ("fixed:heun/karras", "hand-built", 0.1),
            ("global:unipc", "global", 0.05),
        ]
    ]
    rows += [  # a per-guidance row better than every pooled one: the fallback reads the pooled rows
        {"policy": "fixed:euler/karras", "family": "hand-built", "budget": b, "guidance": 7.5,
         "rmse_mean": 0.01, "mean_nfe": float(b)}
        for b in BUDGETS
    ]  # fmt: skip
    (root / "good" / "evaluation").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "good" / "evaluation" / "results.parquet")
    (root / "good" / "evaluation" / "config.json").write_text(json.dumps({"model": "gmm"}))
    own = [  # each expert's own schedules per budget and guidance: the table is served
        {"solver": solver, "budget": b, "guidance": g, "sigmas": schedules[b], "train_rmse": r}
        for b in BUDGETS
        for g in (1.0, 7.5)
        for solver, r in (("unipc", 0.1 if g == 1.0 else 0.3), ("dpmpp-2m", 0.2))
    ]
    untrained_policy(root / "table" / "policy", "gmm", BUDGETS, own)
    shutil.copytree(root / "good" / "policy", root / "copy" / "policy")
    (root / "broken" / "policy").mkdir(parents=True)
    (root / "broken" / "policy" / "policy.json").write_text("{not json")
    shutil.copytree(root / "good" / "policy", root / "other-model" / "policy")
    spec_path = root / "other-model" / "policy" / "policy.json"
    spec = json.loads(spec_path.read_text())
    spec["model"]["fingerprint"] = "0" * 64
    spec_path.write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="module")
def catalog(gmm, policy_root):
    c = Catalog("gmm", gmm, policy_root)
    assert c.swap("good/policy"), c.last_swap
    return c


# --- requests, limits, key: no Ray ---------------------------------------------------------


@pytest.mark.parametrize(
    "body, field, fragment",
    [
        ({"budget": "5"}, "budget", "valid integer"),
        ({"budget": 5.5}, "budget", "valid integer"),
        ({"budget": True}, "budget", "valid integer"),
        ({"budget": 0}, "budget", "greater than or equal to 1"),
        ({"budget": 21}, "budget", "less than or equal to 20"),
        ({"n": 17}, "n", "less than or equal to 16"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"seeds": list(range(17))}, "seeds", "at most 16 items"),
        ({"seeds": []}, "seeds", "at least 1 item"),
        ({"labels": []}, "labels", "at least 1 item"),
        ({"seeds": -1}, "seeds", "greater than or equal to 0"),
        ({"seeds": 2**62 - 3}, "seeds", "less than or equal to"),
        ({"seeds": [1, -1]}, "seeds[1]", "greater than or equal to 0"),
        ({"seeds": [1, 2], "labels": [1]}, "request", "same length"),
        ({"n": 3, "seeds": [1, 2]}, "request", "n is 3"),
        ({"guidance": 11.0}, "guidance", "less than or equal to 10"),
        ({"guidance": -0.5}, "guidance", "greater than or equal to 0"),
        ({"labels": -2}, "labels", "greater than or equal to -1"),
        ({"labels": "x"}, "labels", "valid integer or a valid list"),
        ({"policy": "../../etc/passwd"}, "policy", "never a path"),
        ({"policy": "/etc/passwd"}, "policy", "never a path"),
        ({"policy": "Learned"}, "policy", "never a path"),
        ({"output": "jpeg"}, "output", "'png' or 'array'"),
        ({"budget": 5, "extra": 1}, "extra", "Extra inputs"),
        ([1, 2], "request", "valid dictionary"),
    ],
)
def test_bad_requests_name_the_field_and_the_problem(body, field, fragment):
    with pytest.raises(RequestProblem) as info:
        check_generate(body, Limits())
    problem = info.value
    assert problem.status == 422 and fragment in str(problem)
    assert field in [d["field"] for d in problem.body()["details"]]


def test_the_model_classes_are_part_of_the_contract():
    with pytest.raises(RequestProblem, match="less than or equal to 9"):
        check_generate({"labels": [0, 10]}, Limits(), num_classes=10)
    assert check_generate({"labels": [0, 9, -1]}, Limits(), num_classes=10).labels == [0, 9, -1]
    with pytest.raises(RequestProblem, match="less than or equal to -1"):
        check_generate({"labels": 0}, Limits(), num_classes=0)  # an unconditional model


def test_valid_requests_become_jobs():
    job = check_generate({"seeds": 7, "n": 3, "labels": 2, "budget": 6}, Limits())
    assert job.seeds == [7, 8, 9] and job.labels == [2, 2, 2] and job.budget == 6
    assert job.policy == "learned" and job.output == "png" and job.guidance == 1.0
    random_seeds = check_generate({}, Limits())
    assert len(random_seeds.seeds) == 1 and random_seeds.labels == [-1]
    jobs = check_batch({"requests": [{"seeds": [1, 2]}, {"labels": [3, 4, 5]}]}, Limits())
    assert [len(j.seeds) for j in jobs] == [2, 3]
    last = check_generate({"seeds": 2**62 - 16, "n": 16}, Limits())
    assert last.seeds[-1] == 2**62 - 1


def test_batch_limits_count_requests():
    limits = Limits(max_batch_requests=2)
    with pytest.raises(RequestProblem, match="at most 2 items"):
        check_batch({"requests": [{}] * 3}, limits)
    with pytest.raises(RequestProblem, match="at least 1 item"):
        check_batch({"requests": []}, limits)
    with pytest.raises(RequestProblem) as info:
        check_batch({"requests": [{}, {"budget": 99}]}, limits)
    assert info.value.field == "requests[1].budget"


def test_every_limit_is_in_the_published_schema():
    from rldiff.serving.app import openapi_schema

    limits = Limits(max_samples=8, max_budget=12, max_guidance=9.0, max_batch_requests=4)
    schema = openapi_schema(limits, num_classes=10, key_required=True)
    text = json.dumps(schema)
    refs = {r.split("/")[-1] for r in _refs(schema)}
    assert refs and refs <= set(schema["components"]["schemas"]), "dangling $ref"
    request = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert request["n"]["anyOf"][0]["maximum"] == 8
    assert request["budget"]["maximum"] == 12 and request["budget"]["minimum"] == 1
    assert request["guidance"]["maximum"] == 9.0
    assert request["policy"]["pattern"].startswith("^[a-z0-9]")
    labels = request["labels"]["anyOf"]
    assert labels[0] == {"maximum": 9, "minimum": -1, "type": "integer"}
    assert labels[1]["maxItems"] == 8 and labels[1]["minItems"] == 1
    assert request["seeds"]["anyOf"][0]["maximum"] == 2**62 - 8
    batch = schema["components"]["schemas"]["GenerateBatchRequest"]["properties"]
    assert batch["requests"]["maxItems"] == 4
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    generate = schema["paths"]["/v1/generate"]["post"]
    assert generate["security"] == [{"apiKey": []}] and "431" in generate["responses"]
    assert "security" not in schema["paths"]["/v1/health"]["get"]
    metrics = schema["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]
    assert list(metrics["401"]["content"]) == ["application/json"] and "$defs" not in text
    open_schema = openapi_schema(limits, num_classes=10, key_required=False)
    assert "securitySchemes" not in open_schema["components"]


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_prometheus_texts_merge_into_one_family_each():
    from rldiff.serving.metrics import merge_metrics

    node = (
        "# HELP ray_rldiff_requests_total HTTP requests\n"
        "# TYPE ray_rldiff_requests_total counter\n"
        'ray_rldiff_requests_total{{node="{0}",status="200"}} 3.0\n'
        "# HELP ray_tasks other\nray_tasks 1\n"
        "# HELP ray_rldiff_latency_ms latency\n# TYPE ray_rldiff_latency_ms histogram\n"
        'ray_rldiff_latency_ms_bucket{{node="{0}",le="5"}} 1\n'
        'ray_rldiff_latency_ms_count{{node="{0}"}} 1\n'
    )
    lines = merge_metrics([node.format("a"), node.format("b")], "ray_rldiff_")
    assert not any("ray_tasks" in line for line in lines)
    assert [line for line in lines if line.startswith("#")] == [
        "# HELP ray_rldiff_latency_ms latency",
        "# TYPE ray_rldiff_latency_ms histogram",
        "# HELP ray_rldiff_requests_total HTTP requests",
        "# TYPE ray_rldiff_requests_total counter",
    ]
    assert lines.index("# TYPE ray_rldiff_requests_total counter") == 7  # after 4 latency samples
    assert sum(line.startswith("ray_rldiff_requests_total") for line in lines) == 2


def test_body_reads_end_in_time_and_disconnects_are_no_faults():
    import asyncio

    from starlette.requests import ClientDisconnect

    from rldiff.serving.app import ClientGone, _read_limited

    class Request:
        def __init__(self, chunks, stall=False):
            self.headers, self.chunks, self.stall = {}, chunks, stall

        async def stream(self):
            for chunk in self.chunks:
                if isinstance(chunk, Exception):
                    raise chunk
                yield chunk
            if self.stall:
                await asyncio.sleep(60)

    assert asyncio.run(_read_limited(Request([b"{}", b" "]), 100, 1.0)) == b"{} "
    with pytest.raises(ClientGone):
        asyncio.run(_read_limited(Request([b"{", ClientDisconnect()]), 100, 1.0))
    start = time.perf_counter()
    with pytest.raises(RequestProblem, match="not received within 0.2 s") as info:
        asyncio.run(_read_limited(Request([b"{"], stall=True), 100, 0.2))
    assert info.value.status == 408 and time.perf_counter() - start < 2
    with pytest.raises(RequestProblem, match="larger than 100") as info:
        asyncio.run(_read_limited(Request([b"x" * 60, b"x" * 60]), 100, 1.0))
    assert info.value.status == 413


def test_a_request_that_breaks_the_sampler_fails_alone(monkeypatch):
    """The merged run raises (one job is poisoned): each job runs alone, the poisoned one gets a
    500 and every other one its samples; metrics that fail never fail a request."""
    from rldiff.serving import app as serving_app
    from rldiff.serving import engine
    from rldiff.serving.schemas import Job

    runs = []

    def run_jobs(catalog, jobs, arrived=None):
        runs.append(len(jobs))
        if any(666 in job.seeds for job in jobs):
            raise RuntimeError("poisoned")
        return [{"policy": "moe", "samples": [{"seed": s} for s in job.seeds]} for job in jobs]

    class Metrics:
        def record_batch(self, samples):
            raise RuntimeError("metrics down")

    monkeypatch.setattr(engine, "run_jobs", run_jobs)
    sampler = object.__new__(serving_app.Sampler.func_or_class)
    sampler.catalog, sampler.failures = None, 0
    sampler.metrics = type("M", (), {"record_batch": lambda self, n: None})()
    jobs = [Job([s], [-1], 1.0, 4, "learned", "png") for s in (1, 666, 3)]
    out = sampler._run_merged([(job, 0.0) for job in jobs])
    assert runs == [3, 1, 1, 1]
    assert [o.get("status") for o in out] == [None, 500, None]
    assert out[0]["samples"] == [{"seed": 1}] and out[2]["samples"] == [{"seed": 3}]
    assert out[1]["error"] == "internal error" and sampler.failures == 0
    out = sampler._run_merged([(jobs[1], 0.0)])
    assert out[0]["status"] == 500 and sampler.failures == 1  # the health check counts it
    sampler.metrics = Metrics()
    assert sampler._run_merged([(jobs[0], 0.0)])[0]["samples"] == [{"seed": 1}]


def test_api_key_is_checked_in_constant_time_and_never_shown(tmp_path, monkeypatch):
    assert ApiKey(None).check(None) is None  # no key configured: open
    key = ApiKey(KEY)
    assert "missing" in key.check(None)
    assert "malformed" in key.check(KEY)
    assert key.check("Bearer " + KEY[:-1] + "x") == "invalid API key"
    assert key.check("Bearer " + KEY) is None and key.check("bearer " + KEY) is None
    assert KEY not in repr(key) and KEY not in str(vars(key).keys())
    with pytest.raises(ValueError, match="at least 16"):
        ApiKey("short")
    (tmp_path / "key").write_text(KEY + "\n")
    assert ApiKey.load(file=str(tmp_path / "key")).check("Bearer " + KEY) is None
    monkeypatch.setenv("RLDIFF_TEST_KEY", KEY)
    assert ApiKey.load(env="RLDIFF_TEST_KEY").enabled
    monkeypatch.delenv("RLDIFF_TEST_KEY")
    assert not ApiKey.load(env="RLDIFF_TEST_KEY").enabled
    with pytest.raises(ValueError, match="required"):
        ApiKey.load(env="RLDIFF_TEST_KEY", required=True)


def test_app_arguments_and_the_serve_command_fail_clearly(tmp_path, monkeypatch):
    import argparse

    from rldiff.config import ServeRun, from_flags
    from rldiff.serving import command as serve_command
    from rldiff.serving.app import build_app

    with pytest.raises(ValueError, match="max_samples <= max_batch_samples"):
        build_app({"max_samples": "100"})
    with pytest.raises(ValueError, match="polciy"):
        build_app({"polciy": "x"})
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--port", "70000"])
    args = parser.parse_args(["--policy-root", str(tmp_path), "--require-api-key"])
    server = from_flags(ServeRun, args)
    assert server.host == "127.0.0.1" and server.port == 8000 and server.for_seconds is None
    monkeypatch.delenv("RLDIFF_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key is required"):
        serve_command.run(args)  # before any Ray starts
    args = parser.parse_args(["--policy-root", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serve_command.run(args)


def test_the_serve_command_checks_model_and_policy_before_starting(tmp_path, policy_root):
    """One clear line and a non-zero exit, before any Ray starts; degraded only when asked."""
    import argparse
    import subprocess
    import sys

    from rldiff.config import from_flags
    from rldiff.serving import command as serve_command
    from rldiff.serving.app import AppArgs

    rldiff = Path(sys.executable).parent / "rldiff"
    start = time.perf_counter()
    done = subprocess.run(
        [rldiff, "serve", "--model", str(tmp_path / "nonexistent"), "--policy-root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - start
    print(f"rldiff serve --model <missing>: exit {done.returncode} in {seconds:.1f} s")
    assert done.returncode == 2 and seconds < 10
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    flags = ["--model", "gmm", "--policy-root", str(policy_root)]
    with pytest.raises(ValueError, match="--allow-degraded"):
        serve_command.run(parser.parse_args([*flags, "--policy", "broken/policy"]))
    with pytest.raises(ValueError, match="outside the policy root"):
        serve_command.run(parser.parse_args([*flags, "--policy", "../../../etc"]))
    degraded = parser.parse_args([*flags, "--policy", "broken/policy", "--allow-degraded"])
    assert serve_command.check_inputs(from_flags(AppArgs, degraded)).startswith("DEGRADED")
    good = parser.parse_args([*flags, "--policy", "good/policy"])
    assert serve_command.check_inputs(from_flags(AppArgs, good)) == "policy good/policy"


# --- catalog and engine: no Ray ------------------------------------------------------------


def test_policies_load_only_from_inside_the_root(gmm, policy_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(policy_root / "good" / "policy", outside)
    (policy_root / "link").symlink_to(outside)
    c = Catalog("gmm", gmm, policy_root)
    for directory in ("../outside", str(outside), "link", "good/../../outside"):
        assert not c.swap(directory)
        assert "outside the policy root" in c.last_swap["error"]
    assert c.degraded
    assert c.swap(str(policy_root / "good" / "policy"))  # absolute, but inside: fine


def test_failed_swaps_keep_the_policy_in_service_and_are_reported(gmm, policy_root):
    c = Catalog("gmm", gmm, policy_root)
    assert c.swap("good/policy")
    served = c.learned
    for directory, message in [
        ("broken/policy", "JSONDecodeError"),
        ("other-model/policy", "trained on another model"),
        ("missing/policy", "does not exist"),
        (None, "no policy directory"),
    ]:
        assert not c.swap(directory)
        assert message in c.last_swap["error"] and c.last_swap["requested"] == directory
        assert c.learned is served and not c.degraded
    info = c.info()
    assert info["learned"]["directory"] == "good/policy" and not info["last_swap"]["ok"]


def test_degraded_service_serves_the_best_hand_built_schedule(gmm, policy_root):
    c = Catalog("gmm", gmm, policy_root, evaluation=str(policy_root / "good" / "evaluation"))
    assert not c.swap("broken/policy") and c.degraded
    assert c.resolve("learned", 4)[0] == "fixed:heun/karras"  # lowest RMSE in the evaluation
    assert c.resolve("learned", 5)[0] == default_hand_built(5)  # no row for 5: the default
    job = check_generate({"seeds": [3], "budget": 4}, Limits())
    (response,) = run_jobs(c, [job])
    assert response["degraded"] and response["policy"] == "fixed:heun/karras"
    assert c.info()["degraded"] and "global:unipc" not in c.names()


def test_a_policy_with_own_schedules_serves_its_conditional_table(gmm, policy_root):
    c = Catalog("gmm", gmm, policy_root)
    assert c.swap("table/policy"), c.last_swap
    assert "table" in c.names() and not any(n.startswith("global:") for n in c.names())
    name, _, table = c.resolve("table", 4)
    assert name == "table" and table.entry(4, 1.0).solver == "unipc"
    assert table.entry(4, 7.5).solver == "dpmpp-2m"
    with pytest.raises(LookupError, match="no budget 5"):
        c.resolve("table", 5)
    job = check_generate({"seeds": [3, 4], "budget": 6, "guidance": 7.5}, Limits())
    (response,) = run_jobs(c, [job])
    assert response["policy"] == "moe"
    steps = response["samples"][0]["schedule"]
    assert steps[0]["expert"] == "dpmpp-2m"  # the untrained router's argmax: action 0, the table's


def test_learned_policy_refuses_budgets_it_was_not_trained_for(catalog):
    job = check_generate({"budget": 5}, Limits())
    assert "serves budgets [4, 6]" in str(check_job(catalog, job))
    job = check_generate({"budget": 5, "policy": "fixed:unipc/warp"}, Limits())
    assert "unknown policy" in str(check_job(catalog, job))
    job = check_generate({"labels": 10}, Limits())
    assert check_job(catalog, job).field == "labels"


def test_a_busy_sampler_takes_everything_waiting_in_its_next_run():
    import asyncio

    from rldiff.serving.merge import RunMerger

    release = threading.Event()

    def run(items):
        release.wait(timeout=10)  # the first run is "busy" until the others have queued
        return [item * 10 for item in items]

    async def scenario():
        merger = RunMerger(run, max_size=5)
        calls = [asyncio.create_task(merger.submit([0, 100]))]
        await asyncio.sleep(0.05)  # the first run has started and is busy
        calls += [asyncio.create_task(merger.submit([i, i + 100])) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*calls)
        return merger.runs, results

    runs, results = asyncio.run(scenario())
    assert results == [[i * 10, (i + 100) * 10] for i in range(4)]
    assert runs == [2, 4, 2]  # the first alone, then what waited, up to max_size (5) items


def expected(denoiser, policy, seeds, labels, guidance, budget):
    """The evaluation's sampler on the same seeds, conditions, policy and budget."""
    noise = initial_noise(seeds, tuple(denoiser.sample_shape))
    cond = Condition.make(labels, guidance, batch=len(seeds))
    return sample(denoiser, policy, noise, cond, budget, seeds)


def test_merged_requests_equal_the_sampler_run_alone(catalog, gmm):
    """Requests of different budgets and policies merged into one call: each equals the
    evaluation sampler on its own seeds, up to float32 rounding (a merged batch changes the order
    of the mixture model's reductions: measured up to 2.5e-5, on samples of scale 1). Alone, a request is bit-identical."""
    bodies = [
        {"seeds": [11, 12], "labels": [1, 2], "budget": 4},
        {"seeds": [13], "labels": 3, "budget": 6, "guidance": 2.0},
        {"seeds": [14, 15], "labels": 4, "budget": 4, "policy": "fixed:euler-ancestral/karras"},
        {"seeds": [16], "budget": 6, "policy": "global:unipc"},
    ]
    jobs = [check_generate(dict(b, output="array"), Limits()) for b in bodies]
    responses = run_jobs(catalog, jobs)
    assert [r["timings"]["batch_samples"] for r in responses] == [3, 3, 2, 1]
    for job, response in zip(jobs, responses, strict=True):
        if job.policy == "learned":
            policy = catalog.learned.policy
        elif job.policy == "global:unipc":
            sigmas = tuple(catalog.learned.spec["base_schedule"]["schedules"][str(job.budget)])
            policy = PolicySpec("global:unipc", "global", "unipc", job.budget, sigmas=sigmas)
            policy = policy.build(gmm.noise_table)
        else:
            policy = PolicySpec(
                job.policy, "hand-built", "euler-ancestral", job.budget, schedule="karras"
            ).build(gmm.noise_table)
        alone = expected(gmm, policy, job.seeds, job.labels, job.guidance, job.budget)
        served = torch.tensor([s["array"] for s in response["samples"]], dtype=alone.x0.dtype)
        torch.testing.assert_close(served, alone.x0, rtol=0, atol=1e-4)
        assert [s["nfe"] for s in response["samples"]] == alone.nfe.tolist()
        assert all(s["nfe"] <= job.budget for s in response["samples"])


def test_explanations_describe_the_chosen_schedule():
    steps = [
        {"sigma": 80.0, "expert": "unipc", "eta": 0.0, "confidence": 0.9},
        {"sigma": 5.0, "expert": "unipc", "eta": 0.0, "confidence": 0.95},
        {"sigma": 0.5, "expert": "euler-ancestral", "eta": 0.3, "confidence": 0.41},
    ]
    text = explain("moe", steps, 3, 5)
    assert "3 steps, 3 of 5 NFE (2 left unused)" in text
    assert "unipc at steps 1-2, euler-ancestral at step 3" in text
    assert "0.41-0.95 (least sure at step 3)" in text and "Fresh noise at step(s) 3" in text
    assert "confidence" not in explain(
        "fixed:euler/karras", [dict(steps[0], confidence=None)], 1, 1
    )


# --- the Serve app on 127.0.0.1 ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_config(port: int, policy_root: Path, key_file: Path, policy: str) -> dict:
    """``serve/config.yaml`` for this test: the mixture model, the test root, one replica each."""
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["logging_config"] = {"enable_access_log": False}
    app = config["applications"][0]
    app["args"].update(
        model="gmm",
        policy_root=str(policy_root),
        evaluation=None,
        api_key_file=str(key_file),
        access_log=False,
        allow_degraded=False,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        if deployment["name"] == "Sampler":
            deployment["user_config"] = {"policy": policy}
    return config


def deploy(config: dict) -> None:
    """What ``serve deploy`` does: the dashboard hands the config to the Serve controller."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


class Service:
    def __init__(self, url: str, config: dict):
        import requests

        self.url, self.config, self.http = url, config, requests.Session()
        self.auth = {"Authorization": f"Bearer {KEY}"}

    def post(self, path: str, body=None, headers=None, **kwargs):
        return self.http.post(
            self.url + path, json=body, headers=headers or self.auth, timeout=60, **kwargs
        )

    def get(self, path: str, headers=None):
        return self.http.get(self.url + path, headers=headers or self.auth, timeout=60)

    def swap(self, policy: str) -> None:
        config = json.loads(json.dumps(self.config))
        config["applications"][0]["deployments"][0]["user_config"] = {"policy": policy}
        deploy(config)


@pytest.fixture(scope="module")
def service(ray_local, policy_root, tmp_path_factory):
    from ray import serve

    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(KEY)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = deploy_config(port, policy_root, key_file, "good/policy")
    assert config["applications"][0]["deployments"][0]["name"] == "Sampler"
    try:
        deploy(config)
        yield Service(f"http://127.0.0.1:{port}", config)
    finally:
        serve.shutdown()


def test_the_key_is_required(service):
    body = {"seeds": [1], "budget": 4}
    for headers in ({}, {"Authorization": "Bearer " + "x" * 20}, {"Authorization": KEY}):
        refused = service.post("/v1/generate", body, headers=headers or {"X": "1"})
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"] and refused.headers["WWW-Authenticate"] == "Bearer"
    assert service.get("/v1/policy", headers={"X": "1"}).status_code == 401
    assert service.post("/v1/generate", body).status_code == 200
    assert service.http.get(service.url + "/-/healthz").status_code == 200  # no key needed
    assert service.http.get(service.url + "/docs").status_code == 200


def test_served_samples_equal_the_evaluation_sampler(service, catalog, gmm):
    body = {"seeds": [21, 22, 23], "labels": [0, 5, 9], "budget": 6, "output": "array"}
    response = service.post("/v1/generate", body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["policy"] == "moe" and not data["degraded"] and data["model"] == "gmm"
    alone = expected(gmm, catalog.learned.policy, [21, 22, 23], [0, 5, 9], 1.0, 6)
    served = torch.tensor([s["array"] for s in data["samples"]], dtype=alone.x0.dtype)
    assert torch.equal(served, alone.x0)
    first = data["samples"][0]
    assert first["schedule"][-1]["sigma_next"] == 0 and first["nfe"] == alone.nfe[0]
    assert {step["expert"] for step in first["schedule"]} <= set(EXPERT_NAMES)
    assert {"sigma", "expert", "eta", "confidence", "nfe"} <= set(first["schedule"][0])
    assert first["explanation"].startswith("moe: ") and data["timings"]["total_ms"] > 0
    png = service.post("/v1/generate", {"seeds": [21], "budget": 6}).json()
    assert png["samples"][0]["png_base64"].startswith("iVBORw0KGgo")  # the PNG signature


def test_policy_endpoint_and_batch_calls(service):
    info = service.get("/v1/policy").json()
    assert info["learned"]["directory"] == "good/policy" and info["learned"]["untrained"]
    assert not info["degraded"] and info["api_key_required"]
    assert info["evaluation"]["4"]["best_hand_built"] == "fixed:heun/karras"
    assert "global:unipc" in info["policies"] and info["limits"]["max_samples"] == 16
    body = {
        "requests": [{"seeds": [1], "budget": 4}, {"n": 2, "budget": 6, "policy": "global:unipc"}]
    }
    answer = service.post("/v1/generate/batch", body)
    assert answer.status_code == 200, answer.text
    responses = answer.json()["responses"]
    assert [r["policy"] for r in responses] == ["moe", "global:unipc"]
    assert [len(r["samples"]) for r in responses] == [1, 2]
    bad = service.post("/v1/generate/batch", {"requests": [{"budget": 4}, {"budget": 5}]})
    assert bad.status_code == 422 and bad.json()["details"][0]["field"] == "requests[1].policy"


def test_edge_answers_health_schema_and_allow(service):
    health = service.http.get(service.url + "/v1/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["policy"] == "good/policy" and not health.json()["degraded"]
    schema = service.http.get(service.url + "/openapi.json").json()
    assert {r.split("/")[-1] for r in _refs(schema)} <= set(schema["components"]["schemas"])
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    labels = schema["components"]["schemas"]["GenerateRequest"]["properties"]["labels"]
    assert labels["anyOf"][0]["maximum"] == 9  # the served model's classes
    wrong = service.get("/v1/generate")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    huge = service.post(
        "/v1/generate", {"seeds": [1]}, headers={**service.auth, "X-Pad": "a" * 20_000}
    )
    assert huge.status_code == 431 and "headers larger than" in huge.json()["error"]
    metrics = service.http.get(service.url + "/metrics")
    assert metrics.status_code == 401
    metrics = service.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_poisoned_requests_fail_alone(service):
    """Requests that must fail sent inside rounds of concurrent valid ones: every valid one is
    answered 200 (no collateral failure), every poisoned one a 4xx of its own."""
    from concurrent.futures import ThreadPoolExecutor

    poisons = [
        {"seeds": []},
        {"labels": []},
        {"seeds": [1], "labels": [12]},
        {"budget": 5},  # a budget the learned policy was not trained for: refused by the sampler
        {"seeds": [2], "policy": "fixed:nope/karras"},
        {"requests": [{"seeds": [3], "budget": 4}, {"seeds": []}]},
    ]
    rounds, collateral, valid_ok, poisoned = 5, 0, 0, []

    def send(case):
        kind, body = case
        path = "/v1/generate/batch" if "requests" in body else "/v1/generate"
        return kind, service.post(path, body).status_code

    with ThreadPoolExecutor(16) as pool:
        for r in range(rounds):
            valid = [("valid", {"seeds": [r * 100 + i], "budget": 4}) for i in range(8)]
            cases = valid[:4] + [("poison", p) for p in poisons] + valid[4:]
            for kind, status in pool.map(send, cases):
                if kind == "valid":
                    valid_ok += status == 200
                    collateral += status != 200
                else:
                    poisoned.append(status)
    print(
        f"poisoned batches: {rounds} rounds, {valid_ok} valid answered 200, {collateral} collateral failures, poisoned answers {sorted(set(poisoned))}"
    )
    assert collateral == 0 and valid_ok == rounds * 8
    assert all(400 <= status < 500 for status in poisoned)


def test_slow_bodies_cannot_lock_others_out(service):
    """300 connections send their headers and half a body, then nothing (with a valid key);
    a normal client is still answered at once, and the slow ones are cut after the timeout.
    Ten more disconnect mid-body: a 4xx (408 when the proxy does not pass the disconnect on, else
    499), never a 500 or a traceback (the metrics test counts)."""
    port = int(service.url.rsplit(":", 1)[1])
    head = (
        "POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    slow = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(head + b'{"seeds": [1')
            slow.append(sock)
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as gone:
                gone.sendall(head + b'{"seeds"')
        time.sleep(0.5)  # the slow requests have reached the ingress
        start = time.perf_counter()
        normal = service.post("/v1/generate", {"seeds": [5], "budget": 4})
        seconds = time.perf_counter() - start
        cut, statuses = time.perf_counter(), []
        for sock in slow:
            answer = sock.recv(4096).decode(errors="replace")
            statuses.append(int(answer.split(" ", 2)[1]) if answer else 0)
        waited = time.perf_counter() - cut
    finally:
        for sock in slow:
            sock.close()
    print(
        f"300 slow bodies: a normal request answered {normal.status_code} in {seconds:.2f} s; "
        f"the slow ones answered {sorted(set(statuses))} within {waited + seconds + 0.5:.1f} s"
    )
    assert normal.status_code == 200 and seconds < 2
    assert set(statuses) == {408}


FUZZ_CONFIG = """
[cache]
enabled = false

[warnings]
fail-on = [{fail_on}]

# A schema-valid request is also refused (422) when its policy does not exist or does not serve
# its budget, or when its seeds, labels and n disagree in length: rules a JSON schema cannot state.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "429"]
"""


@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
def test_schema_fuzzer_finds_no_failure(service, tmp_path, with_key):
    """schemathesis, every check, driven by the service's own /openapi.json: bounded in examples
    per operation and in time; with the key (the requests reach validation and the sampler) and
    without it (every answer must be a documented 401)."""
    import subprocess
    import sys

    warnings = ["unresolvable_reference", "unsupported_regex"] + (["missing_auth"] * with_key)
    config = tmp_path / "schemathesis.toml"
    config.write_text(FUZZ_CONFIG.format(fail_on=", ".join(f'"{w}"' for w in warnings)))
    report = tmp_path / "report.json"
    command = [
        Path(sys.executable).parent / "schemathesis", "--config-file", config,
        "run", service.url + "/openapi.json", "--checks", "all", "--max-examples", "25",
        "--workers", "1", "--no-color", "--request-timeout", "20",
        "--generation-database", "none", "--report", "json", "--report-json-path", report,
    ]  # fmt: skip
    if with_key:
        command += ["--header", f"Authorization: Bearer {KEY}"]
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    summary = json.loads(report.read_text())
    operations, cases = summary["operations"], summary["test_cases"]
    print(
        f"schemathesis ({'with' if with_key else 'without'} the key): "
        f"{operations['tested']}/{operations['total']} operations, {cases['generated']} cases, "
        f"{cases['with_failures']} failing, {cases['unique_failures']} unique failures, "
        f"{cases['errored']} errors, {summary['running_time']:.1f} s"
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert operations["tested"] == operations["total"] >= 5 and cases["generated"] >= 100
    assert cases["with_failures"] == cases["unique_failures"] == cases["errored"] == 0


HOSTILE_VALUES = [
    None, "", "x" * 5000, -1, 0, 2**63, 10**30, 1e308, -1e308, 3.5, True, [], {}, [1] * 40,
    ["a"], {"$gt": 1}, "../../etc/passwd", "/etc/shadow", "learned/../../x", "NaN", "\x00",
    "fixed:unipc/../../../x", "C:\\Windows", "%2e%2e%2f", "learned\n", "ＬＥＡＲＮＥＤ",
]  # fmt: skip
FIELDS = ["n", "labels", "guidance", "seeds", "budget", "policy", "output"]


def hostile_requests(count: int, seed: int = 0) -> list[tuple[str, str, bytes, dict]]:
    """``(method, path, body, headers)``: wrong types, out-of-range values, huge bodies, bad
    JSON, path-like policy names, unknown fields and routes, wrong methods."""
    rng = random.Random(seed)
    json_type = {"Content-Type": "application/json"}
    fixed = [
        ("POST", "/v1/generate", b"{bad json", json_type),
        ("POST", "/v1/generate", b"", json_type),
        ("POST", "/v1/generate", b"null", json_type),
        ("POST", "/v1/generate", b"[" * 5000 + b"]" * 5000, json_type),
        ("POST", "/v1/generate", b'{"budget": NaN}', json_type),
        ("POST", "/v1/generate", b'{"guidance": Infinity}', json_type),
        ("POST", "/v1/generate", b"\xff\xfe\x00garbage", {}),
        ("POST", "/v1/generate", b" " * 70_000, json_type),
        ("POST", "/v1/generate", json.dumps({"seeds": list(range(20_000))}).encode(), json_type),
        ("POST", "/v1/generate/batch", json.dumps({"requests": [{}] * 40}).encode(), json_type),
        ("POST", "/v1/generate/batch", b'{"requests": []}', json_type),
        ("POST", "/v1/generate/batch", b'{"requests": "all"}', json_type),
        ("GET", "/v1/generate", b"", {}),
        ("DELETE", "/v1/policy", b"", {}),
        ("POST", "/v1/../../etc/passwd", b"{}", json_type),
        ("GET", "/v1/policy/../../../etc/passwd", b"", {}),
        ("POST", "/v2/generate", b"{}", json_type),
    ]
    out = list(fixed)
    while len(out) < count:
        body = {"seeds": [rng.randrange(1000)], "budget": rng.choice(BUDGETS)}
        for field in rng.sample(FIELDS, rng.randint(1, 3)):
            body[field] = rng.choice(HOSTILE_VALUES)
        if rng.random() < 0.1:
            body[rng.choice(["x", "__proto__", "budget "])] = 1
        path = "/v1/generate"
        if rng.random() < 0.2:
            body, path = {"requests": [body] * rng.randint(1, 3)}, "/v1/generate/batch"
        out.append(("POST", path, json.dumps(body).encode(), json_type))
    return out


def test_fuzz_never_answers_5xx_and_every_4xx_says_why(service):
    from concurrent.futures import ThreadPoolExecutor

    cases = hostile_requests(520)

    def send(case):
        method, path, body, headers = case
        r = service.http.request(
            method, service.url + path, data=body, headers={**service.auth, **headers}, timeout=60
        )
        return r.status_code, r.text

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, cases))
    statuses = [s for s, _ in answers]
    assert len(answers) >= 500
    assert not [a for a in answers if a[0] >= 500], "5xx answers"
    for status, text in answers:
        if 400 <= status < 500:
            error = json.loads(text)["error"]
            assert isinstance(error, str) and len(error) > 5, text
    assert statuses.count(422) > 250 and {400, 404, 405, 413} <= set(statuses)
    chunked = service.http.post(  # no Content-Length: the streamed size is what counts
        service.url + "/v1/generate",
        data=iter([b"[" * 40_000, b"]" * 40_000]),
        headers=service.auth,
    )
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]
    assert service.http.get(service.url + "/-/healthz").status_code == 200
    assert service.post("/v1/generate", {"seeds": [1], "budget": 4}).status_code == 200


def test_hot_swap_under_load_fails_no_request(service):
    """Clients keep sending while the policy is swapped in place (a new directory), then a
    broken one is deployed (refused, the swapped-in one keeps serving), then the original."""
    counts = {"ok": 0, "failed": 0}
    failures = []
    stop = threading.Event()

    def client(i):
        n = 0
        while not stop.is_set() and n < 2000:
            n += 1
            r = service.post("/v1/generate", {"seeds": [i * 10_000 + n], "budget": 4})
            if r.status_code == 200:
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                failures.append((r.status_code, r.text[:200]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        replica = service.get("/v1/policy").json()["replica"]
        service.swap("copy/policy")
        info = service.get("/v1/policy").json()
        assert info["learned"]["directory"] == "copy/policy" and info["last_swap"]["ok"]
        assert info["replica"] == replica  # swapped in place (reconfigure), not replaced
        service.swap("broken/policy")
        info = service.get("/v1/policy").json()
        assert info["learned"]["directory"] == "copy/policy"
        assert not info["last_swap"]["ok"] and "JSONDecodeError" in info["last_swap"]["error"]
        assert not info["degraded"]
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        service.swap("good/policy")
    print(f"hot swap under load: {counts['ok']} ok, {counts['failed']} failed")
    assert counts["failed"] == 0, failures[:3]
    assert counts["ok"] > 20


def test_metrics_reach_the_prometheus_endpoint(service):
    """Requests, latency, NFE, experts and swaps, from ``/metrics`` on the service's own port
    (gathered from the nodes' Ray metrics ports, where Ray exports them every few seconds)."""
    wanted = {
        "ray_rldiff_requests_total",
        "ray_rldiff_request_latency_ms_count",
        "ray_rldiff_nfe_per_sample_count",
        "ray_rldiff_expert_steps_total",
        "ray_rldiff_samples_total",
        "ray_rldiff_policy_swaps_total",
    }
    found: set[str] = set()
    for _ in range(20):  # Ray exports every few seconds
        text = service.get("/metrics").text
        found = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_rldiff")}
        statuses = [
            line for line in text.splitlines() if line.startswith("ray_rldiff_requests_total")
        ]
        if wanted <= found and any('status="408"' in line for line in statuses):
            break

        time.sleep(2)
    assert wanted <= found, sorted(found)
    assert any('status="401"' in line for line in statuses), statuses
    assert any('status="200"' in line for line in statuses)
    assert any('status="408"' in line for line in statuses)  # the slow and the gone clients
    assert not any('status="500"' in line for line in statuses), statuses
