"""rldiff on Ray clusters: ``cluster.yaml`` against Ray's own schema, ``jobs/runtime_env.yaml`` and
``rldiff submit``, and (slow) distributed behaviour on this machine.

The slow tests start Ray clusters of their own, so they never run inside this pytest process
(which may hold the session's ``ray_local``): a head plus two worker nodes
(``ray.cluster_utils.Cluster``) runs in a subprocess of this file (``python tests/test_cluster.py
node-loss OUT.json``), and the job test starts ``ray start --head --block`` in a process group of
its own, submits to it, and ends that group by its id. Everything listens on 127.0.0.1.

Run the slow ones with ``pytest tests/test_cluster.py -m slow -s`` (``-s`` prints the timings).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
WORKER = "rldiff_worker"  # custom resource of the worker nodes: env runners go there only
TINY = {  # a TrainConfig that trains in about a second per iteration (as in tests/test_train.py)
    "model": "gmm",
    "batch_size": 8,
    "budgets": (4, 6),
    "n_train": 24,
    "reference_steps": 60,
    "hidden": (32, 32),
    "train_batch_size": 64,
    "minibatch_size": 64,
    "num_epochs": 1,
}


# ---------------------------------------------------------------- cluster.yaml: Ray's schema


def validated_cluster_config(config: dict) -> dict:
    """``config`` as ``ray up`` sees it: the provider's defaults filled in, then Ray's schema
    (``ray/autoscaler/ray-schema.json``) and its cross-field checks. Raises on a broken config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster_yaml):
    config = validated_cluster_config(cluster_yaml)
    types = config["available_node_types"]
    assert "head_node" not in cluster_yaml and "worker_nodes" not in cluster_yaml  # not legacy
    head, workers = types[config["head_node_type"]], set(types) - {config["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu_types = [t for t in workers if types[t]["resources"].get("GPU") == 1]
    assert gpu_types and all(types[t]["max_workers"] > types[t]["min_workers"] for t in gpu_types)


def test_cluster_yaml_pins_rays_images_and_turns_on_token_auth_everywhere(cluster_yaml):
    import ray

    docker = cluster_yaml["docker"]
    tag = f"rayproject/ray:{ray.__version__}-py311"  # the Ray that rldiff pins, Python 3.11
    assert docker["head_image"] == tag and docker["worker_image"] == f"{tag}-gpu"
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    starts = cluster_yaml["head_start_ray_commands"] + cluster_yaml["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)
    assert cluster_yaml["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster_yaml["head_start_ray_commands"])
    setup = cluster_yaml["head_setup_commands"] + cluster_yaml["worker_setup_commands"]
    assert sum("pip install --quiet -e /home/ray/rldiff" in c for c in setup) == 2
    assert cluster_yaml["file_mounts"]["/home/ray/rldiff"] == "."


@pytest.mark.parametrize(
    "path, value",
    [
        ("availble_node_types", {}),  # a misspelt top-level key
        ("available_node_types.gpu_worker.resources.GPU", "one"),
        ("available_node_types.gpu_worker.resources.GPU", -1),
        ("available_node_types.gpu_worker.node_type", "g5.xlarge"),  # not a node-type key
        ("docker.gpu_image", "rayproject/ray:2.60.0-py311-gpu"),  # not a docker key
        ("head_node_type", "cpu_head"),  # no such node type
        ("available_node_types.gpu_worker.min_workers", 9),  # above the global max_workers
        ("max_workers", "4"),
    ],
)
def test_a_broken_cluster_yaml_fails_validation(cluster_yaml, path, value):
    import jsonschema

    config = copy.deepcopy(cluster_yaml)
    *parents, key = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[key] = value
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validated_cluster_config(config)


def test_the_validation_sees_a_node_type_without_its_required_fields(cluster_yaml):
    import jsonschema

    config = copy.deepcopy(cluster_yaml)
    del config["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validated_cluster_config(config)


# ------------------------------------------------------- runtime_env.yaml and rldiff submit


def submit_main(argv: list[str]) -> int:
    from rldiff.submit import main

    return main(argv)


def test_runtime_env_ships_the_code_without_venv_caches_or_runs():
    from rldiff.submit import load_runtime_env

    env = load_runtime_env(ROOT / "jobs" / "runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {".venv/", ".cache/", "runs/", ".git/"} <= set(env["excludes"])
    assert env["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert "pip" not in env  # the nodes have the dependencies (cluster.yaml)


def test_submit_to_an_unreachable_address_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # a local ray.init() may have set it
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = submit_main(["--address", f"http://127.0.0.1:{port}", "--", "echo", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach a Ray job API" in err and "Traceback" not in err


@pytest.mark.parametrize("token_path", [None, "missing"])
def test_submit_with_token_mode_but_no_token_is_a_clear_error(
    tmp_path, capsys, monkeypatch, token_path
):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token there
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    if token_path:
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / token_path))
    else:
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    code = submit_main(["--address", "http://127.0.0.1:9", "--", "echo", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("RAY_AUTH_TOKEN_PATH" if token_path else "no token was found") in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--"], "no command"),
        ([], "no command"),
        (["--timeout", "-1", "--", "echo"], "--timeout"),
        (["--runtime-env", "nope.yaml", "--", "echo"], "does not exist"),
        (["--runtime-env", "README.md", "--", "echo"], "is not valid YAML"),
    ],
)
def test_bad_submit_arguments_are_clear_errors(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert submit_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [("working_dir: code\n", "is not a directory here"), ("- .venv\n", "must hold a mapping")],
)
def test_submit_checks_the_runtime_env_before_connecting(
    tmp_path, capsys, monkeypatch, text, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "env.yaml").write_text(text)
    assert submit_main(["--runtime-env", "env.yaml", "--", "echo"]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------ distributed behaviour (slow, own processes)


def run_bounded(cmd: list[str], env: dict, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` in a process group of its own; on timeout that group is killed (and only it)."""
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, text=True, stdout=subprocess.PIPE, **kwargs
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:4]} ran past {timeout} s; output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def local_env(**extra) -> dict:
    """The environment of the processes these tests start: loopback only, one torch thread, the
    virtualenv's python and ray first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return {
        **env,
        "PATH": path,
        "OMP_NUM_THREADS": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


@pytest.mark.slow
def test_training_survives_losing_a_worker_node(tmp_path):
    """Head + 2 worker nodes: env runners on the workers; a worker node removed in the middle of
    an iteration; training goes on with the other runner, and the lost one comes back on a
    replacement node."""
    out = tmp_path / "node_loss.json"
    start = time.perf_counter()
    proc = run_bounded(
        [sys.executable, __file__, "node-loss", str(out)], local_env(), timeout=420, cwd=ROOT
    )
    print("".join(line for line in proc.stdout.splitlines(True) if line.startswith("iteration")))
    assert proc.returncode == 0, proc.stdout[-4000:]
    r = json.loads(out.read_text())
    rest = r["iterations_after"][1:]  # the iterations after the one the node was lost in
    print(
        f"node loss: node removed {r['removed_into_iteration_s']:.2f} s into iteration "
        f"{r['removal_iteration']}, which finished {r['removal_iteration_finished_after_s']:.2f} s "
        f"after the removal; then {len(rest)} iterations with one runner, "
        f"{sum(rest) / len(rest):.2f} s each ({r['seconds_per_iteration_before']:.2f} s with two); "
        f"runner back {r['runner_back_after_s']:.2f} s after a node was added; "
        f"whole test {time.perf_counter() - start:.0f} s"
    )
    workers = set(r["worker_nodes"])
    assert len(workers) == 2 and r["head_node"] not in workers
    assert sorted(r["runner_nodes_before"]) == sorted(workers)  # one runner on each worker
    assert r["removed_node"] in workers
    assert 0 < r["removed_into_iteration_s"] < r["removal_iteration_seconds"]  # mid-iteration
    steps = [r["env_steps_before"], *r["env_steps_after"]]
    assert len(r["iterations_after"]) >= 3 and steps == sorted(set(steps))  # training went on
    assert r["healthy_runners_after_removal"] == 1
    assert r["healthy_runners_at_end"] == 2
    assert r["added_node"] in r["runner_nodes_at_end"]
    assert r["removed_node"] not in r["runner_nodes_at_end"]


@pytest.mark.slow
def test_a_job_submitted_to_a_local_head_trains_to_completion(tmp_path):
    """``ray start --head`` on 127.0.0.1 with token authentication and its own temp dir; a short
    training through ``rldiff submit`` runs to completion; ``ray job submit`` takes the same
    runtime environment; a client without the token is refused in a sentence."""
    temp = Path(tempfile.mkdtemp(prefix="rldiff-head-", dir="/tmp"))  # socket paths stay short
    token = temp / "auth_token"
    token.write_text(os.urandom(16).hex())
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    gcs_port, dashboard_port = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats",
            # Ports with fixed defaults (10001, 52365, ...) taken from free ones: another Ray on
            # this machine may hold the defaults.
            *(
                f"--{name}-port={free_port()}"
                for name in (
                    "ray-client-server",
                    "dashboard-agent-listen",
                    "dashboard-agent-grpc",
                    "runtime-env-agent",
                    "metrics-export",
                )
            ),
        ],
        env=local_env(**auth),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_job_api(address, local_env(**auth), head)
        run_dir = tmp_path / "run"
        train = [
            *("python", "jobs/train.py", "--model", "gmm", "--iterations", "2"),
            *("--out", str(run_dir), "--cache", str(tmp_path / "cache"), "--no-evaluate"),
            *("--batch-size", "8", "--budgets", "4,6", "--n-train", "24"),
            *("--reference-steps", "60", "--hidden", "32,32", "--train-batch-size", "64"),
            *("--minibatch-size", "64", "--num-epochs", "1", "--env-runners", "1"),
        ]
        start = time.perf_counter()
        job = run_bounded(
            [sys.executable, "-m", "rldiff.submit", "--address", address, "--", *train],
            local_env(**auth),
            timeout=300,
            cwd=ROOT,
        )
        seconds = time.perf_counter() - start
        print(job.stdout[-2000:])
        print(f"rldiff submit: training job done in {seconds:.1f} s (exit {job.returncode})")
        assert job.returncode == 0, job.stdout[-4000:]
        assert "SUCCEEDED" in job.stdout and "iter    2" in job.stdout
        progress = (run_dir / "progress.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in progress] == [1, 2]
        assert (run_dir / "policy" / "policy.json").is_file()

        check = "import os, rldiff; print('threads', os.environ['OMP_NUM_THREADS'])"
        cli = run_bounded(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", address]
            + ["--runtime-env", "jobs/runtime_env.yaml", "--", "python", "-c", check],
            local_env(**auth),
            timeout=120,
            cwd=ROOT,
            stderr=subprocess.STDOUT,
        )
        assert cli.returncode == 0 and "threads 1" in cli.stdout, cli.stdout[-3000:]

        failing = run_bounded(
            [sys.executable, "-m", "rldiff.submit", "--address", address]
            + ["--", "python", "-c", "raise SystemExit(3)"],
            local_env(**auth),
            timeout=120,
            cwd=ROOT,
        )
        assert failing.returncode == 1 and "FAILED" in failing.stdout

        refused = run_bounded(
            [sys.executable, "-m", "rldiff.submit", "--address", address, "--", "echo", "hi"],
            local_env(),  # no RAY_AUTH_MODE, no token
            timeout=60,
            cwd=ROOT,
            stderr=subprocess.STDOUT,
        )
        assert refused.returncode == 2 and "refused the request" in refused.stdout
        assert "Traceback" not in refused.stdout
    finally:
        stop_head(head, temp)
        shutil.rmtree(temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_api(address: str, env: dict, head: subprocess.Popen, limit_s: float = 90) -> None:
    """Polls the job API (about 1 s apart) until it answers, the head dies, or ``limit_s``."""
    probe = f"from ray.job_submission import JobSubmissionClient as C; C({address!r})"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        ok = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=60
        ).returncode
        if ok == 0:
            return
        time.sleep(1)
    pytest.fail(f"no job API at {address} after {limit_s} s")


def stop_head(head: subprocess.Popen, temp: Path) -> None:
    """Ends the head started above, and only it: SIGTERM to ``ray start --block`` (it stops the
    node's processes), then SIGKILL to what is left of its process group and to any process whose
    command line names its temp dir."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    for pid in pids_mentioning(str(temp)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pids_mentioning(marker: str) -> list[int]:
    """Processes (of this user) whose command line contains ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if proc.stat().st_uid == os.getuid() and marker in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


# ------------------------------------ the node-loss scenario (run as a script, own Ray cluster)


def node_loss_scenario(workdir: Path) -> dict:
    """Head + 2 worker nodes, PPO with 2 env runners pinned to the workers by ``WORKER``; one worker
    node removed mid-iteration, training continued, then a replacement node added. Returns what
    happened, with timings."""
    import threading

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from rldiff.config import TrainConfig
    from rldiff.data.models import load_model
    from rldiff.rl.algo import build_config
    from rldiff.rl.env import training_references

    torch.set_num_threads(1)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    workers = [cluster.add_node(num_cpus=1, resources={WORKER: 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    r: dict = {"head_node": cluster.head_node.node_id}
    r["worker_nodes"] = [w.node_id for w in workers]
    algo = None
    try:
        cfg = TrainConfig(**TINY, cache=str(workdir / "cache"), env_runners=2, iterations=0)
        training_references(load_model("gmm"), cfg.env_config())  # cached for the runners
        # Pin the env runners to the worker nodes (the driver and the learner stay on the head).
        config = build_config(cfg).env_runners(custom_resources_per_env_runner={WORKER: 1})
        algo = config.build_algo()
        group = algo.env_runner_group

        def runner_nodes() -> list[str]:
            return group.foreach_env_runner(
                lambda _: ray.get_runtime_context().get_node_id(), local_env_runner=False
            )

        r["runner_nodes_before"] = runner_nodes()
        times = [_timed_train(algo) for _ in range(2)]
        r["iterations_before"] = len(times)
        r["seconds_per_iteration_before"] = sum(t for t, _ in times) / len(times)
        r["env_steps_before"] = times[-1][1]

        victim = next(w for w in workers if w.node_id == r["runner_nodes_before"][0])
        removed = {}

        def remove():
            removed["at"] = time.perf_counter()
            cluster.remove_node(victim, allow_graceful=False)

        timer = threading.Timer(0.3, remove)
        started = time.perf_counter()
        timer.start()
        seconds, steps = _timed_train(algo)
        timer.join()
        r["removed_node"] = victim.node_id
        r["removal_iteration"] = algo.iteration
        r["removal_iteration_seconds"] = seconds
        r["removed_into_iteration_s"] = removed["at"] - started
        r["removal_iteration_finished_after_s"] = started + seconds - removed["at"]
        after = [(seconds, steps)] + [_timed_train(algo) for _ in range(2)]
        r["iterations_after"] = [t for t, _ in after]
        r["env_steps_after"] = [s for _, s in after]
        r["healthy_runners_after_removal"] = group.num_healthy_remote_env_runners()

        added_at = time.perf_counter()
        added = cluster.add_node(num_cpus=1, resources={WORKER: 1})
        r["added_node"] = added.node_id
        for _ in range(30):  # bounded: about a second per iteration
            _timed_train(algo)
            if group.num_healthy_remote_env_runners() == 2:
                break
        r["runner_back_after_s"] = time.perf_counter() - added_at
        r["healthy_runners_at_end"] = group.num_healthy_remote_env_runners()
        r["runner_nodes_at_end"] = runner_nodes()
        r["iterations_total"] = algo.iteration
    finally:
        if algo is not None:
            algo.stop()
        ray.shutdown()
        cluster.shutdown()
    return r


def _timed_train(algo) -> tuple[float, int]:
    """One iteration: its seconds and the lifetime env steps after it (one line printed)."""
    start = time.perf_counter()
    result = algo.train()
    seconds = time.perf_counter() - start
    steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
    healthy = algo.env_runner_group.num_healthy_remote_env_runners()
    print(f"iteration {algo.iteration}: {seconds:.2f} s, {steps} env steps, {healthy} runners")
    return seconds, steps


if __name__ == "__main__":
    if sys.argv[1:2] == ["node-loss"] and len(sys.argv) == 3:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray starts: 127.0.0.1 only
        os.environ["OMP_NUM_THREADS"] = "1"
        path = Path(sys.argv[2])
        result = node_loss_scenario(path.parent)
        path.write_text(json.dumps(result, indent=2))
        sys.exit(0)
    sys.exit(f"usage: python {sys.argv[0]} node-loss OUT.json")
