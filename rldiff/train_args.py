"""The ``rldiff train`` command line: one flag per ``TrainConfig`` field, parsed with clear
errors (argparse exits with status 2 and says which flag was wrong)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rldiff.algo import TrainConfig
from rldiff.evaluate import _budgets, _names, _positive
from rldiff.solvers import EXPERT_NAMES


def add_arguments(parser) -> None:
    """The ``rldiff train`` flags: the run's own, then one per ``TrainConfig`` field."""

    d = TrainConfig()
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="output directory of the run")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    run.add_argument("--no-evaluate", action="store_true", help="skip the evaluation protocol")
    run.add_argument("--eval-samples", type=_positive, default=512, help="held-out samples")
    run.add_argument("--dashboard", action="store_true", help="start the Ray dashboard too")
    run.add_argument(
        "--no-ablations",
        dest="ablations",
        action="store_false",
        help="skip the ppo-single ablation (the base expert alone, trained after moe)",
    )
    p = parser.add_argument_group("training (TrainConfig)")
    p.add_argument("--model", default=d.model, help="embedded | gmm | a diffusers directory")
    p.add_argument("--iterations", type=_positive, default=d.iterations)
    p.add_argument("--checkpoint-every", type=_positive, default=d.checkpoint_every)
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="samples/episode")
    p.add_argument("--budgets", type=_budgets, default=d.budgets, help="comma-separated NFE")
    p.add_argument("--guidance", type=_floats, default=d.guidance, help="comma-separated scales")
    p.add_argument(
        "--cost-per-nfe",
        type=_floats,
        default=(d.cost_per_nfe,),
        help="reward cost per NFE; several (comma-separated) are drawn per sample",
    )
    p.add_argument("--n-train", type=_positive, default=d.n_train, help="training seeds")
    p.add_argument("--base-expert", choices=EXPERT_NAMES, default=d.base_expert)
    p.add_argument("--experts", type=_names(EXPERT_NAMES), help="experts in play (default: all)")
    p.add_argument("--step-range", type=float_above(1.0), default=d.step_range)
    p.add_argument("--reference-steps", type=_positive, default=d.reference_steps)
    p.add_argument("--cache", default=d.cache, help="reference / schedule cache directory")
    p.add_argument("--lr", type=float_above(0.0), default=d.lr)
    p.add_argument("--entropy-coeff", type=float, default=d.entropy_coeff)
    p.add_argument("--router-entropy-coeff", type=float, default=d.router_entropy_coeff)
    p.add_argument(
        "--router-entropy-final",
        type=_non_negative_float,
        default=d.router_entropy_final,
        help="router entropy bonus reached after --router-entropy-anneal of the iterations",
    )
    p.add_argument(
        "--router-entropy-anneal",
        type=float_above(0.0),
        default=d.router_entropy_anneal,
        help="fraction of the iterations over which the router's bonus is annealed",
    )
    p.add_argument(
        "--router-warm-start",
        type=_warm_start,
        default=d.router_warm_start,
        help="initial router probability of the base expert (0: uniform start)",
    )
    p.add_argument(
        "--expert-init-std",
        type=float_above(0.0),
        default=d.expert_init_std,
        help="initial std of the experts' Gaussian actions in [-1, 1] units",
    )
    p.add_argument("--clip", type=float_above(0.0), default=d.clip)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--lambda", dest="lambda_", type=float, default=d.lambda_)
    p.add_argument("--hidden", type=_ints, default=d.hidden, help="comma-separated MLP sizes")
    p.add_argument("--train-batch-size", type=_positive, default=d.train_batch_size)
    p.add_argument("--minibatch-size", type=_positive, default=d.minibatch_size)
    p.add_argument("--num-epochs", type=_positive, default=d.num_epochs)
    p.add_argument("--env-runners", type=non_negative, default=d.env_runners)
    p.add_argument("--seed", type=int, default=d.seed)


def config_from_args(args) -> TrainConfig:
    cost = args.cost_per_nfe
    return TrainConfig(
        model=args.model,
        batch_size=args.batch_size,
        budgets=args.budgets,
        guidance=args.guidance,
        cost_per_nfe=cost[0] if len(cost) == 1 else cost,
        n_train=args.n_train,
        base_expert=args.base_expert,
        experts=args.experts,
        step_range=args.step_range,
        reference_steps=args.reference_steps,
        cache=args.cache,
        lr=args.lr,
        entropy_coeff=args.entropy_coeff,
        router_entropy_coeff=args.router_entropy_coeff,
        router_entropy_final=args.router_entropy_final,
        router_entropy_anneal=args.router_entropy_anneal,
        router_warm_start=args.router_warm_start,
        expert_init_std=args.expert_init_std,
        clip=args.clip,
        gamma=args.gamma,
        lambda_=args.lambda_,
        hidden=args.hidden,
        train_batch_size=args.train_batch_size,
        minibatch_size=args.minibatch_size,
        num_epochs=args.num_epochs,
        env_runners=args.env_runners,
        iterations=args.iterations,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def _non_negative_float(text: str) -> float:
    values = _floats(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one non-negative number, got {text!r}")
    return values[0]


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(_positive(t) for t in text.split(",") if t.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers")
    return values


def non_negative(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _warm_start(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def float_above(low: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > low:
            raise argparse.ArgumentTypeError(f"expected a number above {low:g}, got {text!r}")
        return value

    return parse
