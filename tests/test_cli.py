"""The ``rldiff`` command imports only the chosen subcommand: training, evaluation and search parse
and run with Ray Serve unimportable; ``rldiff --help`` imports no subcommand at all. Each case runs
in a fresh interpreter, so that what it imports is its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rldiff.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SERVE = ("ray.serve",)
MARK = "@@modules "

# Blocks the named modules (``import ray.serve`` then raises ImportError), runs ``main(argv)``, and
# prints which rldiff and Ray Serve modules ended up imported.
RUNNER = f"""
import json, sys
argv, blocked = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in blocked:
    sys.modules[name] = None
from rldiff.cli import main
try:
    code = main(argv)
except SystemExit as exit:
    code = exit.code
loaded = sorted(
    m for m, module in sys.modules.items()
    if module is not None and (m.startswith("rldiff") or m.startswith("ray.serve"))
)
print({MARK!r} + json.dumps(loaded), flush=True)
sys.exit(code)
"""


def rldiff(*argv: str, blocked: tuple[str, ...] = (), timeout: float = 300):
    """``rldiff ARGV`` in a subprocess: (exit status, stdout without the module line, stderr,
    imported modules)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(list(argv)), json.dumps(list(blocked))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    lines = run.stdout.splitlines()
    modules = [json.loads(line[len(MARK) :]) for line in lines if line.startswith(MARK)]
    out = "\n".join(line for line in lines if not line.startswith(MARK))
    return run.returncode, out, run.stderr, set(modules[0]) if modules else None


def test_top_level_help_lists_every_subcommand_and_imports_none():
    code, out, err, modules = rldiff("--help", blocked=SERVE)
    assert code == 0, err
    words = " ".join(out.split())  # argparse wraps the help lines
    assert "{pretrain,evaluate,train,ratios,submit,serve,tune}" in words
    for command in COMMANDS:
        assert f" {command.name} {command.help}" in words
    assert modules == {"rldiff", "rldiff.cli"}


def test_the_submit_help_line_is_submits_own_description():
    from rldiff import submit

    assert next(c for c in COMMANDS if c.name == "submit").help == submit.DESCRIPTION


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("train", ("--iterations", "--resume", "--no-evaluate", "--no-ablations", "--budgets")),
        ("evaluate", ("--budgets", "--samples", "--bandit-rounds", "--ray", "--cache")),
        ("tune", ("--preset", "--storage-path", "--max-concurrent", "--target-budgets")),
    ],
)
def test_help_works_with_ray_serve_unimportable(command, flags):
    code, out, err, modules = rldiff(command, "--help", blocked=SERVE)
    assert code == 0, err[-3000:]
    assert out.startswith(f"usage: rldiff {command}")
    for flag in flags:
        assert flag in out
    assert not any(
        m.startswith(("ray.serve", "rldiff.serving", "rldiff.serving.command")) for m in modules
    )
    if command == "train":
        assert "rldiff.rl.train" not in modules  # flags only: the training code loads to run


def test_the_serve_blocker_really_blocks_serve():
    """The blocked runs above prove something only if the block works: ``rldiff serve`` needs
    Serve to add its flags and fails without it."""
    code, out, err, _ = rldiff("serve", "--help", blocked=SERVE)
    assert code != 0 and "ray.serve" in err and "--policy-root" not in out


def test_serve_help_still_works():
    code, out, err, modules = rldiff("serve", "--help")
    assert code == 0, err[-3000:]
    assert out.startswith("usage: rldiff serve")
    for flag in ("--policy-root", "--host", "--port", "--require-api-key", "--for-seconds"):
        assert flag in out
    assert "rldiff.serving.app" in modules


def test_evaluate_runs_with_ray_serve_unimportable(tmp_path):
    out_dir = tmp_path / "evaluate"
    code, out, err, modules = rldiff(
        "evaluate", "--model", "gmm", "--samples", "8", "--train-samples", "8",
        "--budgets", "4,6", "--reference-steps", "60", "--search-rounds", "1",
        "--bandit-rounds", "1", "--solvers", "euler", "--schedules", "karras",
        "--global-solvers", "dpmpp-2m", "--out", str(out_dir), "--cache", str(tmp_path / "cache"),
        "--ray", "off", blocked=SERVE,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert f"report: {out_dir / 'report.md'}" in out

    from rldiff.evaluation.ratios import pooled_rows

    rows = pooled_rows(out_dir)
    assert {r["budget"] for r in rows} == {4, 6}
    assert {"fixed:euler/karras", "global:dpmpp-2m", "bandit"} <= {r["policy"] for r in rows}
    assert not any(m.startswith(("ray.serve", "rldiff.serving")) for m in modules)


def test_errors_are_one_line_with_exit_status_2(tmp_path):
    code, out, err, _ = rldiff(
        "evaluate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
        "--ray", "off", blocked=SERVE,
    )  # fmt: skip
    assert code == 2
    assert err.strip().splitlines() == [
        f"rldiff evaluate: error: model directory {tmp_path / 'nope'} does not exist "
        "(run `rldiff pretrain`?)"
    ]


def test_bad_flags_and_unknown_subcommands_are_argparse_errors():
    code, _, err, modules = rldiff("evaluate", "--samples", "0", blocked=SERVE)
    assert code == 2 and "rldiff evaluate: error: argument --samples" in err
    code, _, err, modules = rldiff("bogus")
    assert code == 2 and "invalid choice: 'bogus'" in err
    assert modules == {"rldiff", "rldiff.cli"}


def test_a_failed_command_says_why_and_leaves_no_empty_output(tmp_path, capsys):
    from rldiff.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--out", str(out), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a diffusers model directory" in err
    assert not out.exists()


def test_submit_outside_the_repository_runs_the_installed_package(tmp_path, monkeypatch, capsys):
    from rldiff import submit

    monkeypatch.chdir(tmp_path)
    env = submit.default_runtime_env()
    assert env == {"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}}
    assert "installed on the cluster" in capsys.readouterr().out
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert submit.default_runtime_env() is None  # the repository's jobs/runtime_env.yaml
