"""The ``rldiff`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rldiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from rldiff import evaluate, pretrain, serve_command, submit, train, train_args, tune
    from rldiff.reference import ReferenceBankError

    p = commands.add_parser("pretrain", help="train the embedded digits UNet and the classifier")
    pretrain.add_arguments(p)
    e = commands.add_parser("evaluate", help="every baseline at every NFE budget: table + plots")
    evaluate.add_arguments(e)
    t = commands.add_parser(
        "train", help="multi-agent PPO on the router + experts; export and evaluate the policy"
    )
    train_args.add_arguments(t)
    s = commands.add_parser("submit", help=submit.DESCRIPTION)
    submit.add_arguments(s)
    v = commands.add_parser("serve", help="serve a policy over HTTP with Ray Serve (127.0.0.1)")
    serve_command.add_arguments(v)
    u = commands.add_parser(
        "tune", help="Ray Tune search over the training config; winner picked on held-out seeds"
    )
    tune.add_arguments(u)

    args = parser.parse_args(argv)
    if args.command == "submit":
        return submit.run(args)  # its own clear errors and exit codes
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if args.command == "pretrain":
            pretrain.pretrain(pretrain.config_from_args(args))
        elif args.command == "evaluate":
            cfg = evaluate.config_from_args(args)
            evaluate.run_evaluation(cfg)
            print(f"report: {cfg.out / 'report.md'}")
        elif args.command == "train":
            out = train.run_training(
                train_args.config_from_args(args),
                args.out,
                resume=args.resume,
                evaluate=not args.no_evaluate,
                eval_samples=args.eval_samples,
                dashboard=args.dashboard,
                ablations=args.ablations,
            )
            print(f"policy: {out['policy']}")
            if "evaluation" in out:
                print(f"report: {args.out / 'evaluation' / 'report.md'}")
        elif args.command == "serve":
            return serve_command.run(args)
        elif args.command == "tune":
            return tune.run(args)
    except (FileNotFoundError, ValueError, ReferenceBankError) as err:  # no stack trace
        print(f"rldiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rldiff {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
