"""The evaluation protocol: every policy at every NFE budget, on fixed held-out seeds.

Evaluation seeds (``EVAL_SEED_OFFSET + i``) never overlap the seeds used for optimisation or
training (``0 .. n_train - 1``). Each policy is scored against the reference solution from the same
noise (mean / p90 RMSE), by Fréchet distance and confidence on the shipped digit classifier where
it knows the data (``rldiff.evaluation.quality.distribution_metrics``; NaN otherwise), and by NFE and wall
time. Output: ``results.parquet``, ``report.md``, ``pareto.png``, sample grids (written by
``rldiff.evaluation.report``, which only draws what is computed here; ``chosen_schedules`` samples what
``schedules.png`` shows).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rldiff.baselines.bandit import train_bandit
from rldiff.baselines.global_schedule import optimise_schedule
from rldiff.baselines.oracle import oracle_plan
from rldiff.baselines.specs import PolicySpec
from rldiff.baselines.table import best_table
from rldiff.config import EvaluateConfig, add_flags, from_flags
from rldiff.core.denoisers import Condition
from rldiff.core.error import rmse_per_sample
from rldiff.core.fingerprint import model_fingerprint
from rldiff.core.routing import BaseSchedule
from rldiff.core.sampler import sample
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERT_NAMES
from rldiff.data.models import EMBEDDED, load_model, visible_device
from rldiff.data.reference import DEFAULT_SCHEDULE, DEFAULT_SOLVER, guidance_tag, seed_bank
from rldiff.data.shipped_cache import seed_cache
from rldiff.evaluation.parallel import parallel_map, use_tasks
from rldiff.evaluation.quality import AUTO, distribution_metrics, metric_network_id

EVAL_SEED_OFFSET = 1_000_000
GRID_SAMPLES = 20  # samples kept per policy for the grids: two of each class
SCHEDULE_SAMPLES = 30  # held-out samples per budget in ``chosen_schedules``
CACHED_FAMILIES = (
    "hand-built",
    "global",
    "oracle",
    "adaptive",
    "model",
)  # deterministic given the seeds


MODEL_CHECK = PolicySpec("fixed:unipc/logsnr-uniform", "model", "unipc", 50, "logsnr-uniform")


@dataclass
class SeedSet:
    seeds: list[int]
    cond: Condition
    noise: torch.Tensor
    reference: torch.Tensor

    def at_guidance(self, guidance: float | None) -> SeedSet:
        """The samples at one guidance scale (None, or a scale none of them has: all of them)."""
        if guidance is None:
            return self
        rows = (self.cond.guidance.cpu() == guidance).nonzero().squeeze(1)
        if len(rows) == 0:
            return self
        seeds = [self.seeds[i] for i in rows.tolist()]
        return SeedSet(seeds, self.cond[rows], self.noise[rows], self.reference[rows])


def seed_set(cfg: EvaluateConfig, denoiser, offset: int, n: int, name: str) -> SeedSet:
    seeds = list(range(offset, offset + n))
    ref = seed_bank(cfg.cache, denoiser, name, seeds, cfg.guidance, cfg.reference_steps)
    shape = tuple(ref.x0.shape[1:])
    return SeedSet(seeds, ref.cond, initial_noise(seeds, shape), ref.x0.to(torch.float32))


def run_evaluation(cfg: EvaluateConfig, extra_specs=()) -> list[dict]:
    """Runs the whole protocol and writes the outputs to ``cfg.out``; returns the result rows.
    ``extra_specs``: more ``PolicySpec``s scored beside the baselines (e.g. a learned policy)."""
    from rldiff.evaluation.report import write_report

    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    denoiser = load_model(cfg.model, visible_device())
    shape = getattr(denoiser, "sample_shape", None)
    metrics = distribution_metrics(cfg.model, cfg.metric_network, shape)  # None: no FD
    if cfg.model == EMBEDDED and (added := seed_cache(cfg.cache)):
        print(f"{added} precomputed files for the embedded model copied into {cfg.cache}")
    use_ray = use_tasks(cfg.ray, denoiser)
    device = getattr(denoiser, "device", "cpu")
    print(f"evaluating on {cfg.n_samples} held-out samples on {device}; Ray tasks: {use_ray}")
    evaluation = seed_set(cfg, denoiser, EVAL_SEED_OFFSET, cfg.n_samples, "eval")
    train = seed_set(cfg, denoiser, 0, cfg.n_train, "train")
    schedules = optimise_global_schedules(cfg, denoiser, train, use_ray)
    per_guidance = guidance_schedules(cfg, denoiser, train, use_ray)
    specs = policy_specs(cfg, schedules) + train_bandit_specs(cfg, denoiser, train, schedules)
    specs += table_specs(cfg, per_guidance)
    specs += oracle_specs(cfg, denoiser, evaluation, per_guidance, use_ray)
    specs += list(extra_specs)
    context = (denoiser, evaluation, metrics)
    scores = ScoreCache(cfg, denoiser)
    results = scores.score_all(specs + [MODEL_CHECK], context, use_ray)
    quality = dict(results.pop()[0])  # the model itself, sampled accurately (MODEL_CHECK)
    rows = [row for row, _ in results]
    grids = {row["policy"] + f"@{row['budget']}": x for row, x in results}
    floor = None  # the report says plainly that the distribution metrics are absent
    if metrics is not None:
        mine = cfg.metric_network != AUTO
        network = f"the network `{cfg.metric_network}`" if mine else "the shipped digit classifier"
        floor = {**asdict(metrics.real_floor()), "network": network}
    pq.write_table(pa.Table.from_pylist(result_rows(rows)), cfg.out / "results.parquet")
    table = result_rows(rows + [quality])  # the report shows the model's FD per guidance too
    (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), default=str, indent=2))
    model = {k: _no_nan(v) for k, v in quality.items() if k != "by_guidance"}
    summary = {"floor": floor, "model": model}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(cfg.out, rows, grids, floor, evaluation.reference[:GRID_SAMPLES], quality, table)
    return rows


def policy_specs(cfg: EvaluateConfig, schedules: dict) -> list[PolicySpec]:
    specs = []
    for b in cfg.budgets:
        for solver in cfg.solvers:
            for schedule in cfg.schedules:
                name = f"fixed:{solver}/{schedule}"
                specs.append(PolicySpec(name, "hand-built", solver, b, schedule=schedule))
        for solver in cfg.global_solvers:
            sigmas = tuple(schedules[(solver, b)].tolist())
            specs.append(PolicySpec(f"global:{solver}", "global", solver, b, sigmas=sigmas))
        specs.append(
            PolicySpec("adaptive:dpmpp-2m", "adaptive", "dpmpp-2m", b, tol=cfg.adaptive_tol)
        )
    return specs


def train_bandit_specs(cfg, denoiser, train: SeedSet, schedules: dict) -> list[PolicySpec]:
    """Trains the epsilon-greedy bandit router on the TRAINING seeds (never the evaluation ones),
    stepping around the global UniPC schedules when those were searched; saves it to
    ``bandit.json`` and returns one spec per budget (none when ``bandit_rounds`` is 0)."""
    if cfg.bandit_rounds <= 0:
        return []
    if "unipc" in cfg.global_solvers:
        base = BaseSchedule.make({b: schedules[("unipc", b)] for b in cfg.budgets})
    else:
        base = BaseSchedule()
    start = time.perf_counter()
    bandit = train_bandit(
        denoiser,
        train.reference,
        train.noise,
        train.cond,
        budgets=cfg.budgets,
        base=base,
        rounds=cfg.bandit_rounds,
        seeds=train.seeds,
    )
    path = cfg.out / "bandit.json"
    bandit.save(path)
    print(f"bandit: {cfg.bandit_rounds} rounds in {time.perf_counter() - start:.1f} s -> {path}")
    resolved = str(path.resolve())  # Ray workers may run elsewhere
    return [PolicySpec("bandit", "bandit", "", b, path=resolved) for b in cfg.budgets]


def optimise_global_schedules(cfg, denoiser, train: SeedSet, use_ray: bool) -> dict:
    """The per-budget global schedule of every solver on the whole mix, cached per model and
    search setting: (solver, budget) -> sigmas."""
    jobs = [(s, b, None) for s in cfg.global_solvers for b in cfg.budgets]
    found = optimised(cfg, denoiser, train, jobs, use_ray)
    return {
        (s, b): torch.tensor(found[(s, b, g)]["sigmas"], dtype=torch.float64) for s, b, g in jobs
    }


def guidance_schedules(cfg, denoiser, train: SeedSet, use_ray: bool) -> dict:
    """Every global solver's schedule optimised per budget on the training seeds of each guidance
    scale: (solver, budget, guidance) -> {"sigmas", "train_rmse", ...}. With one scale these are
    the global schedules themselves."""
    scales = [float(g) for g in cfg.guidance]
    jobs = [(s, b, g) for s in cfg.global_solvers for b in cfg.budgets for g in scales]
    if len(scales) == 1:
        found = optimised(cfg, denoiser, train, [(s, b, None) for s, b, _ in jobs], use_ray)
        return {(s, b, scales[0]): found[(s, b, None)] for s, b, _ in jobs}
    return optimised(cfg, denoiser, train, jobs, use_ray)


def optimised(cfg, denoiser, train: SeedSet, jobs: list, use_ray: bool) -> dict:
    """``optimise_schedule`` for each (solver, budget, guidance or None: the whole mix) on the
    training seeds (of that guidance), from the cache where it has them."""
    key = schedule_cache_key(cfg, denoiser)
    path = cfg.cache / "global-schedules.json"
    cached = json.loads(path.read_text()) if path.exists() else {}

    def name(job) -> str:
        solver, budget, guidance = job
        return f"{key}|{solver}|{budget}" + ("" if guidance is None else f"|g{guidance:g}")

    todo = [job for job in jobs if name(job) not in cached]
    found = parallel_map(_optimise, todo, (denoiser, train, cfg.search), use_ray, "schedule search")
    for job, result in zip(todo, found, strict=True):
        cached[name(job)] = result
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    return {job: cached[name(job)] for job in jobs}


def schedule_cache_key(cfg: EvaluateConfig, denoiser) -> str:
    """What the global schedules depend on: model, training seeds, guidance, reference, search."""
    reference = f"{DEFAULT_SOLVER}-{DEFAULT_SCHEDULE}-{cfg.reference_steps}"
    mix = guidance_tag(cfg.guidance)
    return f"{model_fingerprint(denoiser)[:16]}-n{cfg.n_train}-{mix}-{reference}-{cfg.search}"


def _optimise(job, context) -> dict:
    (solver, budget, guidance), (denoiser, train, search) = job, context
    train = train.at_guidance(guidance)
    found = optimise_schedule(
        denoiser, solver, budget, train.noise, train.cond, train.reference, search
    )
    return {
        "sigmas": found.sigmas.tolist(),
        "train_rmse": found.train_rmse,
        "start": found.start_schedule,
        "start_rmse": found.start_rmse,
        "evaluations": found.evaluations,
    }


def table_specs(cfg: EvaluateConfig, per_guidance: dict) -> list[PolicySpec]:
    """The conditional table (``rldiff.baselines.table``), saved to ``table.json``."""
    path = cfg.out / "table.json"
    best_table(per_guidance).save(path)
    resolved = str(path.resolve())
    return [PolicySpec("table", "table", "table", b, path=resolved) for b in cfg.budgets]


def oracle_specs(cfg, denoiser, ev: SeedSet, per_guidance: dict, use_ray: bool) -> list:
    """The oracle's per-sample plans (``rldiff.baselines.oracle``) per budget, cached on disk."""
    identity = {
        "model": model_fingerprint(denoiser),
        "seeds": [ev.seeds[0], len(ev.seeds)],
        "guidance": list(cfg.guidance),
        "reference_steps": cfg.reference_steps,
        "search": str(cfg.search),
        "rounds": cfg.oracle_rounds,
    }
    jobs, paths = [], {}
    for b in cfg.budgets:
        candidates = {(s, g): v["sigmas"] for (s, bb, g), v in per_guidance.items() if bb == b}
        text = json.dumps({**identity, "budget": b, "candidates": sorted(candidates.items())})
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        paths[b] = Path(cfg.cache) / "oracle" / f"{digest}.pt"
        if not paths[b].exists():
            jobs.append((b, candidates))
    context = (denoiser, ev, cfg.search, cfg.oracle_rounds)
    for (b, _), plan in zip(
        jobs, parallel_map(_oracle, jobs, context, use_ray, "oracle"), strict=True
    ):
        paths[b].parent.mkdir(parents=True, exist_ok=True)
        tmp = paths[b].with_suffix(".tmp")
        torch.save(plan, tmp)
        tmp.replace(paths[b])
    return [PolicySpec("oracle", "oracle", "oracle", b, path=str(paths[b])) for b in cfg.budgets]


def _oracle(job, context) -> dict:
    (budget, candidates), (denoiser, ev, search, rounds) = job, context
    experts, sigmas, _ = oracle_plan(
        denoiser, budget, candidates, ev.noise, ev.cond, ev.reference, search, rounds
    )
    return {"experts": experts, "sigmas": sigmas}


class ScoreCache:
    """Scores of the deterministic baselines (``CACHED_FAMILIES``), kept on disk per model,
    held-out seed set, guidance, reference and spec: they do not change between runs, so a
    training run's evaluation only samples its own policies. The cached ``seconds_per_sample``
    is the one measured when the row was first computed. Learned and bandit policies are always
    scored afresh (their files change)."""

    VERSION = 2  # bump when score_policy's row changes meaning

    def __init__(self, cfg: EvaluateConfig, denoiser):
        self.dir = Path(cfg.cache) / "scores"
        self.key = {
            "version": self.VERSION,
            "model": model_fingerprint(denoiser),
            "n_samples": cfg.n_samples,
            "offset": EVAL_SEED_OFFSET,
            "guidance": guidance_tag(cfg.guidance),
            "reference_steps": cfg.reference_steps,
        }
        if cfg.metric_network != AUTO:  # "auto" follows from the model, already in the key
            self.key["metrics"] = metric_network_id(cfg.metric_network)

    def path(self, spec: PolicySpec) -> Path | None:
        if spec.family not in CACHED_FAMILIES:
            return None
        described = {**asdict(spec), "path": Path(spec.path).name}  # the same in any cache folder
        text = json.dumps({**self.key, "spec": described}, sort_keys=True)
        return self.dir / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.pt"

    def score_all(self, specs, context, use_ray: bool) -> list[tuple[dict, torch.Tensor]]:
        """``score_policy`` of every spec, in order: the cached ones read, the others computed."""
        paths = [self.path(s) for s in specs]
        found = [load_score(p) if p is not None and p.exists() else None for p in paths]
        todo = [i for i, f in enumerate(found) if f is None]
        if len(todo) < len(specs):
            print(f"{len(specs) - len(todo)} of {len(specs)} scores from {self.dir}")
        computed = parallel_map(
            score_policy, [specs[i] for i in todo], context, use_ray, "policies"
        )
        for i, result in zip(todo, computed, strict=True):
            found[i] = result
            if paths[i] is not None:
                save_score(paths[i], result)
        return found


def load_score(path: Path) -> tuple[dict, torch.Tensor] | None:
    try:
        saved = torch.load(path, weights_only=True)
        return saved["row"], saved["grid"]
    except Exception:  # a damaged cache entry is recomputed, never fatal
        return None


def save_score(path: Path, result: tuple[dict, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"row": result[0], "grid": result[1].clone()}, tmp)  # clone: not the whole batch
    tmp.replace(path)


def score_policy(spec: PolicySpec, context) -> tuple[dict, torch.Tensor]:
    """One policy at one budget on the held-out set: the pooled row (``guidance`` NaN; every
    mean weighs the mix's scales equally) with one row per guidance scale under ``by_guidance``."""
    denoiser, ev, metrics = context
    policy = spec.build(denoiser.noise_table)
    start = time.perf_counter()
    result = sample(denoiser, policy, ev.noise, ev.cond, spec.budget, seeds=ev.seeds)
    seconds = time.perf_counter() - start
    rmse = rmse_per_sample(result.x0, ev.reference)
    x0 = result.x0.clamp(-1, 1)
    guidance = ev.cond.guidance.cpu()
    scales = sorted(set(guidance.tolist()))
    groups = {g: (guidance == g).nonzero().squeeze(1) for g in scales}
    by_guidance = [
        {**_score_rows(spec, result, rmse, x0, ev, metrics, rows), "guidance": g}
        for g, rows in groups.items()
    ]
    pooled = _score_rows(spec, result, rmse, x0, ev, metrics, torch.arange(len(rmse)))
    if len(groups) > 1:  # equal weight per scale, whatever the group sizes
        for key in ("rmse_mean", "mean_nfe", "confidence"):
            pooled[key] = sum(r[key] for r in by_guidance) / len(by_guidance)
    pooled.update(
        guidance=math.nan,
        seconds_per_sample=seconds / len(ev.seeds),
        sigmas=json.dumps([round(s, 5) for s in _first_schedule(result)]),
        by_guidance=json.dumps(by_guidance),
    )
    if spec.family == "model":  # FD at the floor's sample size too: FD shrinks as n grows
        pooled["fd_at_floor_n"] = math.nan
        if metrics is not None:
            pooled["fd_at_floor_n"] = float(metrics.fd(x0[: metrics.real_floor().count]))
    return pooled, x0[:GRID_SAMPLES].cpu().clone()  # clone: a view would carry the whole batch


def _score_rows(spec, result, rmse, x0, ev, metrics, rows) -> dict:
    """The metrics of the held-out samples ``rows``; ``usage_by_step``: per sampler step, the
    fraction of those samples each expert stepped."""
    counts = usage_counts(result, rows)
    row = {
        "policy": spec.name,
        "family": spec.family,
        "solver": spec.solver,
        "schedule": spec.schedule or spec.family,
        "budget": spec.budget,
        "mean_nfe": float(result.nfe[rows].float().mean()),
        "max_nfe": int(result.nfe[rows].max()),
        "rmse_mean": float(rmse[rows].mean()),
        "rmse_p90": float(rmse[rows].quantile(0.9)),
        "fd": math.nan,  # NaN where no metric network knows the data
        "confidence": math.nan,
        "seconds_per_sample": math.nan,
        "n_samples": len(rows),
        "sigmas": "[]",
        "expert_usage": json.dumps(_fractions(counts.sum(0))),
        "usage_by_step": json.dumps([_fractions(c) for c in counts]),
    }
    if metrics is not None:
        row["fd"] = float(metrics.fd(x0[rows]))
        row["confidence"] = float(metrics.confidence(x0[rows], ev.cond.labels[rows]))
    return row


def result_rows(rows: list[dict]) -> list[dict]:
    """The rows of ``results.parquet``: each pooled row (``guidance`` NaN), then its per-guidance
    rows."""
    out = []
    for row in rows:
        pooled = {k: v for k, v in row.items() if k != "by_guidance"}
        out.append(pooled)
        for g in json.loads(row.get("by_guidance") or "[]"):
            out.append({**{k: pooled.get(k) for k in pooled}, **g})
    return out


def _no_nan(value):
    """NaN as null, so summary.json stays standard JSON."""
    return None if isinstance(value, float) and math.isnan(value) else value


def usage_counts(result, rows: torch.Tensor) -> torch.Tensor:
    """``[steps, experts]``: how many of the held-out samples ``rows`` each expert stepped, per step."""
    mask = torch.zeros(len(result.nfe), dtype=torch.bool)
    mask[rows] = True
    counts = [
        torch.bincount(r.expert.cpu()[mask[r.rows.cpu()]], minlength=len(EXPERT_NAMES))
        for r in result.steps
    ]
    return torch.stack(counts).float() if counts else torch.zeros(0, len(EXPERT_NAMES))


def _fractions(counts: torch.Tensor) -> dict[str, float]:
    total = float(counts.sum()) or 1.0
    return {n: round(float(c) / total, 4) for n, c in zip(EXPERT_NAMES, counts, strict=True) if c}


def _first_schedule(result) -> list[float]:
    steps = result.schedule(0)
    return [steps[0]["sigma"]] + [s["sigma_next"] for s in steps] if steps else []


@dataclass
class ChosenSchedules:
    """The schedules a policy chose for the first held-out samples, per budget."""

    policy: str
    experts: tuple[int, ...]  # the policy's experts (indices into EXPERT_NAMES)
    steps: dict[int, list[list[tuple[float, int]]]]  # budget -> sample -> (sigma, expert) per step
    mean_nfe: dict[int, float]  # budget -> mean NFE of those samples


def chosen_schedules(
    policy, cfg: EvaluateConfig, denoiser, n: int = SCHEDULE_SAMPLES
) -> ChosenSchedules:
    """``policy`` sampled on the first ``n`` held-out seeds of ``cfg`` at each of its budgets:
    sigma at each step's start (the final jump to sigma = 0 left out) and the expert taking it."""
    held_out = seed_set(cfg, denoiser, EVAL_SEED_OFFSET, cfg.n_samples, "eval")
    n = min(n, len(held_out.seeds))
    steps, mean_nfe = {}, {}
    for budget in cfg.budgets:
        run = sample(
            denoiser, policy, held_out.noise[:n], held_out.cond[:n], budget, held_out.seeds[:n]
        )
        steps[budget] = [[(s["sigma"], s["expert"]) for s in run.schedule(i)] for i in range(n)]
        mean_nfe[budget] = float(run.nfe.float().mean())
    return ChosenSchedules(policy.name, tuple(policy.experts), steps, mean_nfe)


def add_arguments(parser) -> None:
    """The ``rldiff evaluate`` flags: one per ``EvaluateConfig`` setting."""
    add_flags(parser, EvaluateConfig)


def config_from_args(args) -> EvaluateConfig:
    return from_flags(EvaluateConfig, args)
