"""The training driver: multi-agent PPO on the router + experts, then export and evaluation.

``run_training`` prepares what every env runner needs on the driver (the base expert's optimised
global schedule per budget as the warm start, the cached reference bank of the training seeds),
builds the algorithm with ``rldiff.algo.build_config`` (the one RLlib config builder), points a
fresh run's router at the base expert and narrows the experts' initial spread
(``rldiff.algo.warm_start``; not on resume), trains with
one progress line per iteration, TensorBoard event files and periodic checkpoints, resumes from the
newest checkpoint when asked, exports the policy (``rldiff.learned_policy``) and scores it with the
evaluation protocol beside every baseline. Output layout under ``out``::

    train_config.json  progress.jsonl  tensorboard/  checkpoints/iter_XXXX/  policy/
    evaluation/{results.parquet, report.md, pareto.png, schedules.png, ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from rldiff.algo import TrainConfig, build_config, module_ids, warm_start
from rldiff.env import training_references
from rldiff.evaluate import EVAL_SEED_OFFSET, EvaluateConfig, PolicySpec, seed_set
from rldiff.learned_policy import LearnedPolicy, export_policy
from rldiff.models import EMBEDDED, load_model
from rldiff.shipped_cache import seed_cache
from rldiff.solvers import EXPERT_NAMES

CHECKPOINT = re.compile(r"^iter_(\d{4,})$")
LOSSES = ("policy_loss", "vf_loss", "entropy", "mean_kl_loss", "vf_explained_var", "total_loss")
LEARNED_NAME = "moe"  # the router + experts policy
SINGLE_NAME = "ppo-single"  # the ablation: one expert, step size only
SCHEDULE_SAMPLES = 30  # held-out samples per budget panel in schedules.png


def run_training(
    cfg: TrainConfig,
    out: Path,
    resume: bool = False,
    evaluate: bool = True,
    eval_samples: int = 512,
    eval_overrides: dict | None = None,
    dashboard: bool = False,
    ablations: bool = False,
) -> dict:
    """Trains ``cfg.iterations`` iterations (counted from the checkpoint when resuming), exports
    ``out/policy`` and, if ``evaluate``, writes ``out/evaluation``. With ``ablations`` it also
    trains the ``ppo-single`` ablation (``single_expert_config``: the base expert alone, step size
    only) into ``out/ablations/ppo-single`` and evaluates it beside ``moe``. ``eval_overrides``
    replace ``EvaluateConfig`` fields (smaller searches in tests). Returns a summary of the run."""
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} holds checkpoints already: pass resume (--resume) or a new out")
    if resume and checkpoint is None:
        print(f"nothing to resume in {out / 'checkpoints'}: starting at iteration 1")
    if checkpoint is not None:
        cfg = _resumed_config(cfg, out / "train_config.json")
    ev = evaluation_config(cfg, out, eval_samples, eval_overrides)
    denoiser = load_model(cfg.model)  # fails fast on a bad model spec, before Ray starts
    if cfg.model == EMBEDDED and (added := seed_cache(cfg.cache)):
        print(f"{added} precomputed files for the embedded model copied into {cfg.cache}")
    started_ray = start_ray(dashboard)
    try:
        if cfg.base_schedules is None:
            cfg = dataclasses.replace(cfg, base_schedules=base_schedules(cfg, ev, denoiser))
        training_references(denoiser, cfg.env_config())  # built once here, cached for the runners
        runs = {LEARNED_NAME: (cfg, out)}
        if ablations:
            runs[SINGLE_NAME] = (single_expert_config(cfg), out / "ablations" / SINGLE_NAME)
        summary, policies = {}, {}
        for name, (run_cfg, run_out) in runs.items():
            print(f"training {name}: {', '.join(module_ids(run_cfg.env_config()['experts']))}")
            done = _train_and_export(run_cfg, run_out, latest_checkpoint(run_out / "checkpoints"))
            policies[name] = done["policy"]
            summary = summary or done  # the summary of the main run (moe)
            if name != LEARNED_NAME:
                summary.setdefault("ablations", {})[name] = done
        if evaluate:
            summary["evaluation"] = evaluate_policies(ev, policies, denoiser)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return summary


def single_expert_config(cfg: TrainConfig) -> TrainConfig:
    """The ``ppo-single`` ablation of ``cfg``: the base expert alone (no router), same warm start,
    budgets and reward. Its env step is one sampler step, where ``cfg``'s is half of one (a router
    turn, then an expert turn), so half the env steps per iteration give both the same denoiser
    work per iteration."""
    half = max(1, cfg.train_batch_size // 2)
    return dataclasses.replace(
        cfg,
        experts=(cfg.base_expert,),
        train_batch_size=half,
        minibatch_size=min(cfg.minibatch_size, half),
    )


def _train_and_export(cfg: TrainConfig, out: Path, checkpoint: Path | None) -> dict:
    """Trains one policy into ``out`` (resuming from ``checkpoint``) and exports ``out/policy``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    summary = _train(cfg, out, checkpoint)
    policy_dir = export_policy(
        summary["checkpoint"], out / "policy", cfg, cfg.base_schedules, summary
    )
    summary["policy"] = str(policy_dir)
    return summary


def evaluation_config(
    cfg: TrainConfig, out: Path, eval_samples: int, overrides: dict | None = None
) -> EvaluateConfig:
    """The evaluation protocol for this run: the training budgets and model, held-out seeds, and
    the same cache (so the base schedules found here are the protocol's global schedules)."""
    base = EvaluateConfig(
        out=Path(out) / "evaluation",
        model=cfg.model,
        n_samples=eval_samples,
        budgets=tuple(sorted(cfg.budgets)),
        guidance=float(cfg.guidance[0]),
        reference_steps=cfg.reference_steps,
        cache=Path(cfg.cache),
    )
    return dataclasses.replace(base, **(overrides or {}))


def base_schedules(cfg: TrainConfig, ev: EvaluateConfig, denoiser) -> dict[int, list[float]]:
    """The base expert's optimised global schedule per training budget (the warm start), from the
    evaluation protocol's cache (computed there and then on first use: minutes on the UNet)."""
    from rldiff.evaluate import optimise_global_schedules
    from rldiff.parallel import connect_ray

    search = dataclasses.replace(ev, global_solvers=(cfg.base_expert,))  # ev: cfg's budgets
    train = seed_set(search, denoiser, 0, search.n_train, "train")
    found = optimise_global_schedules(search, denoiser, train, connect_ray(search.ray))
    return {b: found[(cfg.base_expert, b)].tolist() for b in search.budgets}


def latest_checkpoint(directory: Path) -> Path | None:
    """The ``iter_XXXX`` checkpoint with the highest iteration (partial ``.tmp`` ones ignored)."""
    found = [
        (int(m.group(1)), p)
        for p in (directory.iterdir() if directory.is_dir() else [])
        if (m := CHECKPOINT.match(p.name)) and p.is_dir()
    ]
    return max(found)[1] if found else None


def _train(cfg: TrainConfig, out: Path, checkpoint: Path | None) -> dict:
    """The iteration loop; returns the last iteration's summary and its checkpoint."""
    from ray.rllib.algorithms.algorithm import Algorithm
    from tensorboardX import SummaryWriter

    if checkpoint is None:
        algo = build_config(cfg).build_algo()
        warm = warm_start(algo, cfg)  # fresh runs only: a checkpoint has its own modules
        if warm:
            print("router warm start: " + " ".join(f"{n} {p:.2f}" for n, p in warm.items()))
        _truncate_progress(out / "progress.jsonl", 0)
    else:
        algo = Algorithm.from_checkpoint(str(checkpoint.resolve()))  # a relative path fails
        print(f"resumed from {checkpoint} at iteration {algo.iteration}")
        _truncate_progress(out / "progress.jsonl", algo.iteration)
    modules = module_ids(cfg.env_config().get("experts"))
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=algo.iteration + 1)
    saved, seconds, row, ran = checkpoint, [], {}, []
    try:
        while algo.iteration < cfg.iterations:
            start = time.perf_counter()
            result = algo.train()
            seconds.append(time.perf_counter() - start)
            row = iteration_row(result, modules, seconds[-1])
            ran.append(row["iteration"])
            _log(row, writer, out / "progress.jsonl")
            if row["iteration"] % cfg.checkpoint_every == 0 or algo.iteration >= cfg.iterations:
                saved = _save(algo, out / "checkpoints")
        if saved is None:  # iterations=0 on a fresh run: export the untrained policy
            saved = _save(algo, out / "checkpoints")
    finally:
        writer.close()
        algo.stop()
    return {
        "iteration": algo.iteration,
        "iterations_run": ran,  # in this call; progress.jsonl has every one since iteration 1
        "checkpoint": str(saved),
        "seconds_per_iteration": sum(seconds) / len(seconds) if seconds else None,
        "final": row,
    }


def iteration_row(result: dict, modules, seconds: float) -> dict:
    """The figures worth keeping from RLlib's result dict, flat and JSON-able."""
    runners = result.get("env_runners", {})
    custom = _flatten(runners.get("rldiff", {}))
    row = {
        "iteration": int(result["training_iteration"]),
        "env_steps": int(runners.get("num_env_steps_sampled_lifetime", 0)),
        "seconds": seconds,
        **{f"rldiff/{k}": float(v) for k, v in custom.items()},
    }
    if custom.get("rmse_base_mean"):
        row["rldiff/rmse_vs_base"] = custom.get("rmse_mean", math.nan) / custom["rmse_base_mean"]
    timers = result.get("timers", {})
    for key, name in (("env_runner_sampling_timer", "sample"), ("learner_update_timer", "learn")):
        if key in timers:  # RLlib's smoothed timers: where an iteration's time goes
            row[f"charts/{name}_seconds"] = float(timers[key])
    returns = runners.get("module_episode_returns_mean", {})
    for m in modules:
        learner = result.get("learners", {}).get(m, {})
        row.update({f"losses/{m}/{k}": float(learner[k]) for k in LOSSES if k in learner})
        if m in returns:
            row[f"charts/module_return/{m}"] = float(returns[m])
    return row


def _log(row: dict, writer, progress: Path) -> None:
    """One progress line, TensorBoard scalars and a ``progress.jsonl`` row per iteration."""
    step = row["iteration"]
    tags = {k.replace("rldiff/expert_usage/", "charts/expert_usage/"): v for k, v in row.items()}
    tags.update(
        {"charts/env_steps": row["env_steps"], "charts/seconds_per_iteration": row["seconds"]}
    )
    for tag, value in tags.items():
        if "/" in tag and math.isfinite(value):
            writer.add_scalar(tag, value, step)
    writer.flush()
    with progress.open("a") as f:
        f.write(json.dumps(row) + "\n")
    usage = " ".join(
        f"{n} {row[k]:.2f}" for n in EXPERT_NAMES if (k := f"rldiff/expert_usage/{n}") in row
    )
    print(
        f"iter {step:4d} | env steps {row['env_steps']:7d} | "
        f"reward {row.get('rldiff/reward_mean', math.nan):+.3f} | "
        f"rmse/base {row.get('rldiff/rmse_vs_base', math.nan):.3f} | "
        f"nfe {row.get('rldiff/nfe_mean', math.nan):.2f} | usage {usage or '-'} | "
        f"H(router) {_entropy_text(row)} | {row['seconds']:.1f} s",
        flush=True,
    )


def _entropy_text(row: dict) -> str:
    entropy = row.get("rldiff/router_entropy")
    return "-" if entropy is None else f"{entropy:.3f}"  # "-": no router (one expert)


def _save(algo, directory: Path) -> Path:
    """``algo.save`` into ``iter_XXXX`` via a temporary name: a kill mid-save leaves no partial
    checkpoint that ``latest_checkpoint`` would pick."""
    path = directory / f"iter_{algo.iteration:04d}"
    tmp = directory / f"{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save(str(tmp.resolve()))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def evaluate_policies(ev: EvaluateConfig, policies: dict[str, str], denoiser) -> list[dict]:
    """The protocol with the learned policies (name -> exported directory) beside every
    baseline, plus ``schedules.png`` of the main one (``moe``)."""
    from rldiff.evaluate import run_evaluation

    paths = {name: str(Path(p).resolve()) for name, p in policies.items()}
    extra = [
        PolicySpec(name, "learned", "router", b, path=path)
        for name, path in paths.items()
        for b in ev.budgets
    ]
    rows = run_evaluation(ev, extra_specs=extra)
    policy = LearnedPolicy.load(paths[LEARNED_NAME], name=LEARNED_NAME)
    plot_schedules(policy, ev, denoiser, ev.out / "schedules.png")
    return [r for r in rows if r["family"] == "learned"]


def plot_schedules(policy, ev: EvaluateConfig, denoiser, path: Path) -> None:
    """Sigma per step (log axis) of ~30 held-out samples per budget, points coloured by expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from rldiff.sampler import sample

    held_out = seed_set(ev, denoiser, EVAL_SEED_OFFSET, ev.n_samples, "eval")
    n, colours = min(SCHEDULE_SAMPLES, len(held_out.seeds)), plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        1, len(ev.budgets), figsize=(3 * len(ev.budgets), 3.4), sharey=True, squeeze=False
    )
    for ax, budget in zip(axes[0], ev.budgets, strict=True):
        run = sample(
            denoiser, policy, held_out.noise[:n], held_out.cond[:n], budget, held_out.seeds[:n]
        )
        for i in range(n):
            steps = run.schedule(i)  # the final jump to sigma = 0 is off the log axis
            sigma = [s["sigma"] for s in steps]
            ax.plot(range(len(sigma)), sigma, color="0.8", lw=0.6, zorder=1)
            ax.scatter(
                range(len(sigma)), sigma, s=12, c=[colours(s["expert"]) for s in steps], zorder=2
            )
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_title(f"{budget} NFE (mean {run.nfe.float().mean():.2f})", fontsize=9)
    axes[0, 0].set_ylabel("sigma at the step's start")
    handles = [
        Line2D([], [], marker="o", ls="", color=colours(k), label=EXPERT_NAMES[k])
        for k in policy.experts
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"Schedules chosen by `{policy.name}` on {n} held-out samples", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def start_ray(dashboard: bool) -> bool:
    """Connects to ``RAY_ADDRESS`` when set, else starts a local Ray on 127.0.0.1 only; returns
    whether this call started (or connected) it, so the caller shuts it down again."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:  # "local": a new Ray of its own, never some other Ray that happens to run here
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # must precede the start
        ray.init(address="local", include_dashboard=dashboard)
    return True


def _resumed_config(cfg: TrainConfig, path: Path) -> TrainConfig:
    """The saved config of the run being resumed, with this request's iteration count and
    checkpoint period (the restored algorithm keeps its own RLlib config anyway)."""
    if not path.exists():
        return cfg
    saved = config_from_json(json.loads(path.read_text()))
    keep = {"iterations", "checkpoint_every"}
    differ = [
        f.name
        for f in dataclasses.fields(cfg)
        if f.name not in keep | {"base_schedules"}
        and getattr(cfg, f.name) != getattr(saved, f.name)
    ]
    if differ:
        print(f"resuming with the saved settings; ignoring the new {', '.join(differ)}")
    return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in keep})


def config_from_json(data: dict) -> TrainConfig:
    """``train_config.json`` back to a ``TrainConfig`` (tuples, integer budget keys)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k: v for k, v in data.items() if k in names}
    for key in ("budgets", "guidance", "hidden", "experts", "cost_per_nfe"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    if data.get("base_schedules") is not None:
        data["base_schedules"] = {int(b): s for b, s in data["base_schedules"].items()}
    return TrainConfig(**data)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_progress(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _truncate_progress(path: Path, iteration: int) -> None:
    """Drops rows past the checkpoint being resumed (iterations that will run again)."""
    rows = [r for r in _read_progress(path) if r["iteration"] <= iteration]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def add_arguments(parser) -> None:
    """The ``rldiff train`` flags: the run's own, then one per ``TrainConfig`` field."""
    from rldiff.evaluate import _budgets, _names, _positive

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
        type=float,
        default=d.router_entropy_final,
        help="router entropy bonus reached after --router-entropy-anneal of the iterations",
    )
    p.add_argument("--router-entropy-anneal", type=float, default=d.router_entropy_anneal)
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
    import argparse

    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    from rldiff.evaluate import _positive

    values = tuple(_positive(t) for t in text.split(",") if t.strip())
    if not values:
        import argparse

        raise argparse.ArgumentTypeError("expected comma-separated positive integers")
    return values


def non_negative(text: str) -> int:
    import argparse

    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _warm_start(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def float_above(low: float):
    def parse(text: str) -> float:
        import argparse

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > low:
            raise argparse.ArgumentTypeError(f"expected a number above {low:g}, got {text!r}")
        return value

    return parse
