"""Benchmark: a policy's decision time per sampler step against one denoiser forward, batch 64.

Run (from the repository root):

    .venv/bin/python jobs/bench_policy.py --policy DIR        # an exported LearnedPolicy directory
    .venv/bin/python jobs/bench_policy.py --random-modules    # fresh modules, same architecture

Options: ``--batch 64 --repeats 50 --warmup 5 --steps 3 --device cpu --bandit FILE`` (a saved
``BanditPolicy``; default an untrained one with random arm values, which costs the same).

On the embedded digits UNet, with 1 torch thread, it measures the denoiser's time per step (one
forward of the whole batch at the observed noise levels) and each policy's decision time per step
(``act(obs)``: observation features, router forward, expert forwards, ``decision_from_actions``),
as medians over ``--repeats`` after ``--warmup`` calls, on the observations of the first
``--steps`` steps of a real sampler run under that policy (a mix of budgets 6, 8 and 10). It prints
both times and the ratio decision / denoiser per policy; the target is <= 5 %. No asserts.

What to expect (measured on a shared 2-core CPU machine, no GPU, batch 64): the denoiser takes
about 90-140 ms per step; the router + experts policy about 1 ms (0.7 ms with one expert), so the
ratio is about 1 %; the bandit about 0.2 ms (0.2 %). Most of the policy's time is the features and
``decision_from_actions``, not the module forwards (about 0.15 ms each). On a GPU the denoiser step
shrinks by an order of magnitude or more while the policy (on the CPU) does not: the ratio grows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BUDGETS = (3, 4, 5, 6, 8, 10)


def random_learned_policy(seed: int = 0):
    """A ``LearnedPolicy`` over freshly initialised modules built from ``build_config``'s spec."""
    from rldiff.baselines.learned import LearnedPolicy
    from rldiff.config import TrainConfig
    from rldiff.core.solvers import EXPERT_NAMES
    from rldiff.rl.algo import ROUTER, fresh_modules
    from rldiff.rl.export import policy_net_from_module

    torch.manual_seed(seed)
    multi = fresh_modules(TrainConfig())
    ids = list(multi.keys())
    nets = {m: policy_net_from_module(multi[m]) for m in ids}
    experts = [m for m in ids if m != ROUTER]
    spec = {
        "router": ROUTER,
        "experts": [
            {"name": EXPERT_NAMES[int(m[7:])], "index": int(m[7:]), "module": m} for m in experts
        ],
        "base_schedule": {"schedules": None, "step_range": 3.0},
        "cost_per_nfe": 0.0,
    }
    return LearnedPolicy(spec, nets, name="random-modules")


def default_bandit(seed: int = 0):
    from rldiff.baselines.bandit import BanditPolicy
    from rldiff.core.routing import BaseSchedule

    bandit = BanditPolicy.empty(BUDGETS, BaseSchedule(), epsilon=0.1)
    bandit.values = np.random.default_rng(seed).normal(size=bandit.values.shape)
    return bandit


def median_seconds(fn, repeats: int, warmup: int, device) -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(policy, denoiser, args) -> dict:
    """Runs the first ``args.steps`` sampler steps under ``policy`` and times both per step."""
    from rldiff.core.denoisers import Condition, labels_for_seeds
    from rldiff.core.sampler import Sampling
    from rldiff.core.seeds import initial_noise

    b = args.batch
    seeds = list(range(10_000, 10_000 + b))
    noise = initial_noise(seeds, (1, 16, 16)).to(args.device)
    cond = Condition.make(labels_for_seeds(seeds, denoiser.num_classes), 1.0)
    budget = torch.as_tensor(np.random.default_rng(0).choice([6, 8, 10], b))
    batch = Sampling(denoiser, noise, cond, budget, seeds)
    decide, forward, rows = [], [], []
    for _ in range(args.steps):
        if batch.done:
            break
        obs = batch.observe()
        x, sigma, c = batch.x[obs.index].clone(), obs.sigma.clone(), cond[obs.index]
        decide.append(median_seconds(lambda o=obs: policy.act(o), args.repeats, args.warmup, "cpu"))
        forward.append(
            median_seconds(
                lambda x=x, s=sigma, c=c: denoiser(x, s, c), args.repeats, args.warmup, args.device
            )
        )
        rows.append(len(obs.index))
        batch.advance(policy.act(obs))
    return {"rows": rows, "decision": decide, "denoiser": forward}


def report(name: str, result: dict) -> None:
    d, f = statistics.median(result["decision"]), statistics.median(result["denoiser"])
    per_step = ", ".join(
        f"{n} rows: {a * 1e3:.3f}/{g * 1e3:.2f} ms"
        for n, a, g in zip(result["rows"], result["decision"], result["denoiser"], strict=True)
    )
    print(
        f"{name:>16}: decision {d * 1e3:8.3f} ms/step   denoiser {f * 1e3:8.2f} ms/step   "
        f"ratio {100 * d / f:6.2f} %   [{per_step}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="an exported LearnedPolicy directory")
    which.add_argument("--random-modules", action="store_true", help="fresh modules, same shape")
    parser.add_argument("--bandit", help="a saved BanditPolicy JSON (default: random values)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="sampler steps to time")
    parser.add_argument("--device", default="cpu", help="the denoiser's device")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from rldiff.baselines.bandit import BanditPolicy
    from rldiff.data.models import load_model

    denoiser = load_model("embedded", args.device)
    if args.policy:
        from rldiff.baselines.learned import LearnedPolicy

        learned = LearnedPolicy.load(args.policy)
    else:
        learned = random_learned_policy()
    bandit = BanditPolicy.load(args.bandit) if args.bandit else default_bandit()
    print(
        f"embedded model, batch {args.batch}, device {args.device}, torch threads "
        f"{torch.get_num_threads()}, medians of {args.repeats} after {args.warmup} warm-up calls "
        f"(decision / denoiser per step; target ratio <= 5 %)"
    )
    for name, policy in [(learned.name, learned), ("bandit", bandit)]:
        report(name, bench(policy, denoiser, args))


if __name__ == "__main__":
    main()
