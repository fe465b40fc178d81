"""The ``rldiff`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Each subcommand's module is imported only when that subcommand is chosen (to add its flags and
# to run it): ``rldiff train`` never imports Ray Serve, ``rldiff --help`` imports none of them.


def _pretrain(args: argparse.Namespace) -> int:
    from rldiff.data import pretrain

    pretrain.pretrain(pretrain.config_from_args(args))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rldiff.evaluation import protocol as evaluate
    from rldiff.evaluation import transfer

    cfg = evaluate.config_from_args(args)
    extra = transfer.policy_specs(cfg) if cfg.policy else []  # refused before any work
    evaluate.run_evaluation(cfg, extra_specs=extra)
    print(f"report: {cfg.out / 'report.md'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from rldiff.rl import train, train_args

    run = train_args.run_from_args(args)
    out = train.run_training(
        train_args.config_from_args(args),
        run.out,
        resume=run.resume,
        evaluate=run.evaluate,
        eval_samples=run.eval_samples,
        dashboard=run.dashboard,
        ablations=run.ablations,
    )
    print(f"policy: {out['policy']}")
    if "evaluation" in out:
        print(f"report: {Path(run.out) / 'evaluation' / 'report.md'}")
    return 0


def _ratios(args: argparse.Namespace) -> int:
    from rldiff.evaluation import ratios

    return ratios.run(args)


def _submit(args: argparse.Namespace) -> int:
    from rldiff import submit

    return submit.run(args)


def _serve(args: argparse.Namespace) -> int:
    from rldiff.serving import command as serve_command

    return serve_command.run(args)


def _tune(args: argparse.Namespace) -> int:
    from rldiff.search import tune

    return tune.run(args)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``arguments`` names the module whose ``add_arguments(parser)`` adds its
    flags; ``run(args)`` returns the exit status. ``own_errors``: ``run`` reports its errors and
    chooses its exit codes itself."""

    name: str
    help: str
    arguments: str
    run: Callable[[argparse.Namespace], int]
    own_errors: bool = False


COMMANDS = (
    Command(
        "pretrain",
        "train the embedded digits UNet and the classifier",
        "rldiff.data.pretrain",
        _pretrain,
    ),
    Command(
        "evaluate",
        "every baseline at every NFE budget: table + plots",
        "rldiff.evaluation.protocol",
        _evaluate,
    ),
    Command(
        "train",
        "multi-agent PPO on the router + experts; export and evaluate the policy",
        "rldiff.rl.train_args",
        _train,
    ),
    Command(
        "ratios",
        "the ratios that judge the router, from results.parquet",
        "rldiff.evaluation.ratios",
        _ratios,
    ),
    Command(
        "submit",
        "run a command as a Ray job on a cluster and follow it to its end",  # submit.DESCRIPTION
        "rldiff.submit",
        _submit,
        own_errors=True,
    ),
    Command(
        "serve",
        "serve a policy over HTTP with Ray Serve (127.0.0.1)",
        "rldiff.serving.command",
        _serve,
    ),
    Command(
        "tune",
        "Ray Tune search over the training config; winner picked on held-out seeds",
        "rldiff.search.tune",
        _tune,
    ),
)


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its flags are added the first time it parses (only the chosen
    subcommand's parser ever does)."""

    def __init__(self, *args, command: Command, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command
        self._loaded = False

    def parse_known_args(self, args=None, namespace=None):
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.command.arguments).add_arguments(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    """The ``rldiff`` parser; no subcommand module is imported until one is chosen."""
    parser = argparse.ArgumentParser(prog="rldiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for command in COMMANDS:
        commands.add_parser(command.name, help=command.help, command=command)
    return parser


def _reported(err: Exception) -> bool:
    """Errors printed as one line (no stack trace): missing files, bad values, unusable
    reference banks (only ever raised once ``rldiff.data.reference`` is imported)."""
    if isinstance(err, (FileNotFoundError, ValueError)):
        return True
    reference = sys.modules.get("rldiff.data.reference")
    return reference is not None and isinstance(err, reference.ReferenceBankError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    if command.own_errors:
        return command.run(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the --out folder (flags are stored as "<Config>.out")
    out = next((v for k, v in vars(args).items() if k.split(".")[-1] == "out" and v), None)
    new_out = out is not None and not Path(out).exists()
    status = 1  # an error printed with its trace
    try:
        status = _run(command, args)
    finally:
        if new_out and status != 0:
            _remove_if_empty(Path(out))
    return status


def _run(command: Command, args: argparse.Namespace) -> int:
    """The command's exit status; a reported error is one line on stderr and status 2."""
    try:
        return command.run(args)
    except KeyboardInterrupt:
        print(f"rldiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not _reported(err):
            raise
        print(f"rldiff {args.command}: error: {err}", file=sys.stderr)
        return 2


def _remove_if_empty(folder: Path) -> None:
    """Removes ``folder`` if a failed command created it and wrote no file into it."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
