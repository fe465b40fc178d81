"""Benchmark: where one training iteration's time goes, per sample-step, in the driver.

Run (from the repository root):

    .venv/bin/python jobs/bench_train.py                          # gmm, batch 32, real denoiser
    .venv/bin/python jobs/bench_train.py --denoiser zero          # the overhead alone
    .venv/bin/python jobs/bench_train.py --model embedded --batch 32 --iterations 2 --json out.json

Options: ``--model gmm|embedded`` (default gmm), ``--batch 32`` (samples per episode,
``TrainConfig.batch_size``), ``--denoiser real|zero``, ``--warmup 1 --iterations 3`` (warm-up
iterations are run and left out), ``--train-batch-size N``, ``--minibatch-size N`` (rows of a
module per SGD step; both default to ``TrainConfig``'s),
``--device cpu|cuda`` (the denoiser's; default cpu), ``--cache DIR`` (default ``TrainConfig``'s),
``--seed 0``, ``--json FILE`` (every number below, per iteration too).

It builds the algorithm with ``rldiff.rl.algo.build_config(TrainConfig(...))`` and
``env_runners=0`` on a local Ray (2 CPUs, no dashboard), so the env, the modules and the learner
all run in this process with one torch thread, and times them with wrappers around stable names
only: ``RoutingEnv.reset`` / ``step``, the model that ``rldiff.rl.env.load_model`` returns,
``Sampling.advance``, ``MultiRLModule.forward_exploration`` / ``forward_inference``, the local
env runner's ``sample()`` and ``LearnerGroup.update`` (what PPO's ``training_step`` calls in Ray
2.60). Each wrapper times only its outermost call (no double counting of nested calls of the same
kind) and every time is *exclusive*: a region's time less the time of the timed regions inside it.

A **sample-step** is one sample advanced by one sampler step: ``Sampling.advance`` called inside
``RoutingEnv.step`` counts the rows it advances (the samples of its decision, i.e. the unfinished
samples before the call), however many env steps (router turn, expert turn, ...) one sampler step
takes. The columns, in microseconds per sample-step (an iteration's time / its sample-steps, over
the timed iterations together):

- ``denoiser``: time inside the model's calls (``__call__``) made by the env, the base-schedule
  rollouts that the env runs in ``reset`` for its reward baseline (cached per seed, guidance and
  budget, so they fade as training goes on) included: see ``base steps`` below;
- ``env``: ``RoutingEnv.reset`` + ``step`` less the denoiser inside them (observation features,
  decisions from actions, the experts' updates, rewards, agent dicts);
- ``rllib``: the env runner's ``sample()`` less the env and the module forwards: RLlib's episode
  bookkeeping and the env-to-module / module-to-env connector pipelines, action sampling and
  logp included, metrics;
- ``modules``: ``MultiRLModule.forward_exploration`` / ``forward_inference`` called inside
  ``sample()`` (the MLP forwards of every module for one env step's agents);
- ``learner``: ``LearnerGroup.update`` (learner connector pipeline: GAE, value forwards, batching;
  then every SGD epoch and minibatch of every module);
- ``other``: the rest of ``Algorithm.train()`` (weight sync to the env runner, metrics reduction,
  result dict);
- ``total``: ``Algorithm.train()`` wall time;
- ``of which reset``: the part of ``denoiser`` + ``env`` spent in ``RoutingEnv.reset`` (mostly
  the base-schedule rollouts while their cache fills).

``steps/iter`` is the sample-steps per iteration, ``base steps/iter`` the sample-steps of the
base-schedule rollouts in ``reset`` (not in the divisor), ``s/iter`` the seconds per iteration.

``--denoiser zero`` wraps the loaded model so that each call inside the env returns a ready tensor
of the right shape, ``x / (1 + sigma^2)`` (the exact denoiser of unit Gaussian data: an elementwise
product, microseconds, and it keeps the trajectories and rewards finite), so the overhead that
dominates once the denoiser runs on a GPU is visible on any CPU. Outside ``reset`` / ``step`` (the
cached reference bank built in the env's ``__init__``) it calls the real model, so no cache file is
ever written from the fake one. Every attribute of the model (``num_classes``, ``device``,
``noise_table``, ``fingerprint`` ...) is the real model's.

The base schedule is ``TrainConfig``'s default (the logSNR split; ``rldiff train`` first optimises
one per budget, which changes the schedule, not the cost per step). The reference bank of the
training seeds is built on first use (shipped for the embedded model and copied into the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # must precede Ray's start

import torch  # noqa: E402

COLUMNS = ("denoiser", "env", "rllib", "modules", "learner", "other", "total")
ENV_REGIONS = ("env.reset", "env.step")
SAMPLE = "sample"


class Profiler:
    """Exclusive time per region, counted on one thread (the driver's), outermost calls only."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.local = threading.local()
        self.clear()

    def clear(self) -> None:
        self.self_time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.denoiser_in: dict[str, float] = defaultdict(float)  # denoiser time by parent region
        self.steps: dict[str, int] = defaultdict(int)  # sample-steps by enclosing env region

    @property
    def stack(self) -> list:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def open(self, region: str) -> bool:
        return any(frame[0] == region for frame in self.stack)

    def in_env(self) -> bool:
        return any(frame[0] in ENV_REGIONS for frame in self.stack)

    def wrap(self, region: str, fn, only_inside: str | None = None):
        """``fn`` timed as ``region`` (skipped when nested in itself, or outside ``only_inside``)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.open(region) or (only_inside and not self.open(only_inside)):
                return fn(*args, **kwargs)
            return self.run(region, fn, *args, **kwargs)

        timed.__bench_wrapped__ = True
        return timed

    def run(self, region: str, fn, *args, **kwargs):
        frame = [region, 0.0]  # region, time of the timed regions inside it
        stack = self.stack
        stack.append(frame)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.cuda and region == "denoiser":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            stack.pop()
            self.self_time[region] += elapsed - frame[1]
            self.calls[region] += 1
            if stack:
                stack[-1][1] += elapsed
                if region == "denoiser":
                    self.denoiser_in[stack[-1][0]] += elapsed

    def count_steps(self, rows: int) -> None:
        where = next((f[0] for f in reversed(self.stack) if f[0] in ENV_REGIONS), "outside")
        self.steps[where] += rows

    def snapshot(self) -> dict:
        return {
            "self_time": dict(self.self_time),
            "calls": dict(self.calls),
            "denoiser_in": dict(self.denoiser_in),
            "steps": dict(self.steps),
        }


class BenchDenoiser:
    """The loaded model, timed; with ``zero``, its calls inside the env return ``x / (1 + s^2)``.
    Every other attribute is the real model's (delegation)."""

    def __init__(self, model, profiler: Profiler, zero: bool):
        self.__dict__.update(_bench_model=model, _bench_profiler=profiler, _bench_zero=zero)

    def __call__(self, x, sigma, *args, **kwargs):
        profiler, model = self._bench_profiler, self._bench_model
        if self._bench_zero and profiler.in_env():
            return profiler.run("denoiser", _gaussian_denoiser, x, sigma)
        return profiler.run("denoiser", model, x, sigma, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["_bench_model"], name)

    def __setattr__(self, name, value):
        setattr(self._bench_model, name, value)


def _gaussian_denoiser(x: torch.Tensor, sigma) -> torch.Tensor:
    scale = 1.0 / (1.0 + torch.as_tensor(sigma, device=x.device).to(x.dtype) ** 2)
    return x * scale.reshape(-1, *([1] * (x.dim() - 1))) if scale.dim() else x * scale


def _advanced_rows(sampling, decision) -> int:
    """Rows one ``Sampling.advance(decision)`` steps: the decision's samples (the unfinished
    ones, observed before the call)."""
    for field in dataclasses.fields(decision) if dataclasses.is_dataclass(decision) else ():
        value = getattr(decision, field.name)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return int((sampling.sigma > 0).sum())


def instrument(profiler: Profiler, zero: bool) -> None:
    """Class-level wrappers (before the algorithm is built): env, model loading, sampler,
    MultiRLModule forwards."""
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule

    import rldiff.rl.env as env_module
    from rldiff.core.sampler import Sampling

    env_cls = env_module.RoutingEnv
    for name in ("reset", "step"):
        setattr(env_cls, name, profiler.wrap(f"env.{name}", getattr(env_cls, name)))

    real_load = env_module.load_model

    @functools.wraps(real_load)
    def load_model(*args, **kwargs):
        return BenchDenoiser(real_load(*args, **kwargs), profiler, zero)

    env_module.load_model = load_model

    real_advance = Sampling.advance

    @functools.wraps(real_advance)
    def advance(self, decision, *args, **kwargs):
        rows = _advanced_rows(self, decision)
        out = real_advance(self, decision, *args, **kwargs)
        profiler.count_steps(rows)
        return out

    Sampling.advance = advance

    for name in ("forward_exploration", "forward_inference"):
        fn = getattr(MultiRLModule, name)
        setattr(MultiRLModule, name, profiler.wrap("modules", fn, only_inside=SAMPLE))


def instrument_algorithm(profiler: Profiler, algo) -> None:
    """Instance-level wrappers: the driver's env runner's ``sample()``, ``LearnerGroup.update``."""
    runner = algo.env_runner_group.local_env_runner
    if runner is None:
        raise RuntimeError("no local env runner: build with env_runners=0")
    runner.sample = profiler.wrap(SAMPLE, runner.sample)
    group = algo.learner_group
    group.update = profiler.wrap("learner", group.update)


def columns(snap: dict, train_seconds: float) -> dict:
    """Seconds per column (see the module docstring) from a profiler snapshot."""
    t = defaultdict(float, snap["self_time"])
    return {
        "denoiser": t["denoiser"],
        "env": sum(t[r] for r in ENV_REGIONS),
        "rllib": t[SAMPLE],
        "modules": t["modules"],
        "learner": t["learner"],
        "other": t["iteration"],
        "total": train_seconds,
        # of denoiser + env: the part in reset (the base-schedule rollouts for the reward baseline)
        "reset": t["env.reset"] + snap["denoiser_in"].get("env.reset", 0.0),
    }


def parse_args(argv=None) -> argparse.Namespace:
    from rldiff.config import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("gmm", "embedded"), default="gmm")
    parser.add_argument("--batch", type=int, default=32, help="samples per episode")
    parser.add_argument("--denoiser", choices=("real", "zero"), default="real")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="iterations run first, not timed")
    parser.add_argument("--train-batch-size", type=int, default=defaults.train_batch_size)
    parser.add_argument(
        "--minibatch-size",
        type=int,
        default=defaults.minibatch_size,
        help="rows per SGD step (default: TrainConfig's, which scales with --batch)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache", default=defaults.cache)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    if args.iterations < 1 or args.warmup < 0 or args.batch < 1 or args.train_batch_size < 1:
        parser.error("--iterations and --batch must be >= 1, --warmup >= 0")
    return args


def train_config(args):
    from rldiff.config import TrainConfig

    defaults = TrainConfig()
    return dataclasses.replace(
        defaults,
        model=args.model,
        batch_size=args.batch,
        train_batch_size=args.train_batch_size,
        minibatch_size=args.minibatch_size,
        iterations=args.warmup + args.iterations,
        env_runners=0,
        seed=args.seed,
        cache=args.cache,
        env_overrides={**defaults.env_overrides, "device": args.device},
    )


def table(rows: list[dict]) -> str:
    head = (
        "| config | denoiser | env | rllib | modules | learner | other | total "
        "| of which reset | steps/iter | base steps/iter | s/iter |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        us = r["us_per_sample_step"]
        lines.append(
            f"| {r['name']} | "
            + " | ".join(f"{us[c]:.1f}" for c in COLUMNS)
            + f" | {us['reset']:.1f}"
            + f" | {r['sample_steps_per_iteration']:.0f} | {r['base_sample_steps_per_iteration']:.0f}"
            + f" | {r['seconds_per_iteration']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import ray

    import rldiff
    from rldiff.rl.algo import build_config

    cfg = train_config(args)
    name = f"{args.model} b{args.batch} {args.denoiser} tb{args.train_batch_size}"
    name += f" mb{cfg.minibatch_rows()} {args.device}"
    print(f"rldiff from {Path(rldiff.__file__).parent}; {name}; torch threads 1", flush=True)
    if args.model == "embedded":  # the shipped reference bank, if this checkout ships one
        try:
            from rldiff.data.shipped_cache import seed_cache

            seed_cache(cfg.cache)
        except ImportError:
            pass

    profiler = Profiler(cuda=args.device == "cuda")
    instrument(profiler, zero=args.denoiser == "zero")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    algo = None
    try:
        start = time.perf_counter()
        algo = build_config(cfg).build_algo()
        print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
        instrument_algorithm(profiler, algo)
        per_iteration = []
        for i in range(args.warmup + args.iterations):
            profiler.clear()
            start, cpu = time.perf_counter(), time.process_time()
            result = profiler.run("iteration", algo.train)
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu
            snap = profiler.snapshot()
            steps = snap["steps"].get("env.step", 0)
            base = sum(v for k, v in snap["steps"].items() if k != "env.step")
            env_steps = result.get("env_runners", {}).get("num_env_steps_sampled", float("nan"))
            row = {
                "iteration": i + 1,
                "warmup": i < args.warmup,
                "seconds": seconds,
                "cpu_seconds": cpu,  # this process's CPU time: well below seconds = contention
                "load_average": os.getloadavg()[0],
                "sample_steps": steps,
                "base_sample_steps": base,
                "env_steps": float(env_steps),
                "seconds_by_column": columns(snap, seconds),
                **snap,
            }
            per_iteration.append(row)
            split = " ".join(
                f"{c} {row['seconds_by_column'][c]:.2f}" for c in COLUMNS if c != "total"
            )
            print(
                f"iter {i + 1}{' (warm-up)' if row['warmup'] else ''}: {seconds:.2f} s, "
                f"{steps} sample-steps (+{base} base), {env_steps} env steps | {split} | "
                f"cpu/wall {cpu / seconds:.2f} load {row['load_average']:.1f}",
                flush=True,
            )
    finally:
        if algo is not None:
            algo.stop()
        if started:
            ray.shutdown()

    timed = [r for r in per_iteration if not r["warmup"]]
    steps = sum(r["sample_steps"] for r in timed)
    seconds = {c: sum(r["seconds_by_column"][c] for r in timed) for c in (*COLUMNS, "reset")}
    summary = {
        "name": name,
        "rldiff": str(Path(rldiff.__file__).parent),
        "args": vars(args),
        "timed_iterations": len(timed),
        "sample_steps_per_iteration": steps / len(timed),
        "base_sample_steps_per_iteration": sum(r["base_sample_steps"] for r in timed) / len(timed),
        "env_steps_per_iteration": sum(r["env_steps"] for r in timed) / len(timed),
        "seconds_per_iteration": seconds["total"] / len(timed),
        "cpu_over_wall": sum(r["cpu_seconds"] for r in timed) / seconds["total"],
        "seconds": seconds,
        "us_per_sample_step": {c: 1e6 * s / max(steps, 1) for c, s in seconds.items()},
        "iterations": per_iteration,
    }
    print(table([summary]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
