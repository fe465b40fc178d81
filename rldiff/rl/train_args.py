"""The ``rldiff train`` command line: the run's settings, then the training's (``rldiff.config``)."""

from __future__ import annotations

from rldiff.config import TrainConfig, TrainRun, add_flags, from_flags


def add_arguments(parser) -> None:
    add_flags(parser, TrainRun, title="run")
    add_flags(parser, TrainConfig, title="training (TrainConfig)")


def config_from_args(args) -> TrainConfig:
    return from_flags(TrainConfig, args)


def run_from_args(args) -> TrainRun:
    return from_flags(TrainRun, args)
