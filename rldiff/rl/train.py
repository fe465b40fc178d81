"""The training driver: multi-agent PPO on the router + experts, then export and evaluation.

``run_training`` prepares what every env runner needs on the driver (the base expert's optimised
global schedule per budget as the base schedule, the cached reference bank of the training seeds),
trains with ``rldiff.rl.loop`` (the algorithm from ``rldiff.rl.algo.build_config``, the one RLlib config
builder, whose modules start with the router on the base expert and the experts' spread narrowed,
a resumed run's with its checkpoint's weights; one progress line per iteration, ``charts/*`` and
``losses/<module>/*`` in ``progress.jsonl`` and TensorBoard, periodic checkpoints), resumes from
the newest checkpoint when asked, exports the policy (``rldiff.rl.export``) and scores it
with the evaluation protocol beside every baseline.

Learning from traffic: ``conditions_from`` (a traffic log directory) makes the env draw each
sample's condition from the logged requests (``traffic_config``), and ``init_policy`` starts the
modules from an exported policy, keeping what its actions mean (``fine_tune_config``: its experts,
sizes, base schedules, budgets, guidance and cost). The evaluation then also compares the new
policy with the initial one and the table under the traffic's conditions on held-out seeds
(``rldiff.evaluation.traffic``: ``evaluation/traffic.{md,json}`` and a section of ``report.md``).
Output layout under ``out``::

    train_config.json  progress.jsonl  tensorboard/  checkpoints/iter_XXXX/  policy/
    evaluation/{results.parquet, report.md, pareto.png, schedules.png, ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from rldiff.baselines.learned import LearnedPolicy
from rldiff.baselines.specs import PolicySpec
from rldiff.config import HELD_OUT, EvaluateConfig, TrainConfig
from rldiff.data.models import EMBEDDED, load_model, visible_device
from rldiff.data.shipped_cache import seed_cache
from rldiff.evaluation.protocol import chosen_schedules, seed_set
from rldiff.evaluation.report import plot_schedules
from rldiff.rl.algo import module_ids, warm_start_note
from rldiff.rl.env import training_references, unconditional_references
from rldiff.rl.export import export_policy
from rldiff.rl.loop import (
    SECONDS,
    RunLog,
    iterations,
    latest_checkpoint,
    save_checkpoint,
    start_algorithm,
)

LEARNED_NAME = "moe"  # the router + experts policy
INITIAL_NAME = "initial"  # the policy a fine-tuning run started from (--init-policy)
SINGLE_NAME = "ppo-single"  # the ablation: one expert, step size only


def run_training(
    cfg: TrainConfig,
    out: Path,
    resume: bool = False,
    evaluate: bool = True,
    eval_samples: int = HELD_OUT,
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
    # Fails fast on a bad model spec, before Ray starts; prepares on the GPU where there is one.
    denoiser = load_model(cfg.model, visible_device())
    cfg = traffic_config(fine_tune_config(cfg, denoiser), denoiser)
    ev = evaluation_config(cfg, out, eval_samples, eval_overrides)
    if ablations and cfg.init_policy:
        print("no ppo-single ablation when fine-tuning (it has no initial policy)")
        ablations = False
    started_ray = start_ray(dashboard)
    try:
        cfg = prepare_training(cfg, ev, denoiser)
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
        if cfg.init_policy:
            policies[INITIAL_NAME] = cfg.init_policy
        if evaluate:
            summary["evaluation"] = evaluate_policies(ev, policies, denoiser)
        if evaluate and cfg.conditions:
            summary["traffic"] = evaluate_on_traffic(ev, cfg, policies, denoiser)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return summary


def prepare_training(cfg: TrainConfig, ev: EvaluateConfig, denoiser) -> TrainConfig:
    """What every env runner (or Tune trial) needs, done once on the driver: the shipped
    precomputed inputs copied into the cache (embedded model), the base expert's global schedule
    per budget (filled into the returned config when it has none) and the reference bank of the
    training seeds (cached on disk, read by the runners)."""
    if cfg.model == EMBEDDED and (added := seed_cache(cfg.cache)):
        print(f"{added} precomputed files for the embedded model copied into {cfg.cache}")
    if cfg.base_schedules is None:
        cfg = dataclasses.replace(cfg, base_schedules=base_schedules(cfg, ev, denoiser))
    training_references(denoiser, cfg.env_config())
    unconditional_references(denoiser, cfg.env_config())  # where the traffic has label -1
    return cfg


def fine_tune_config(cfg: TrainConfig, denoiser) -> TrainConfig:
    """``cfg`` fine-tuning ``cfg.init_policy`` (unchanged without one): the policy must load here
    and have been trained on this model; its experts, hidden sizes, base schedules, budgets,
    guidance and cost per NFE replace ``cfg``'s, so its actions keep their meaning."""
    if not cfg.init_policy:
        return cfg
    from rldiff.core.fingerprint import model_fingerprint

    directory = Path(cfg.init_policy).resolve()
    LearnedPolicy.load(directory)  # format and observation layout, or a one-line error
    spec = json.loads((directory / "policy.json").read_text())
    trained_on = spec.get("model", {})
    if trained_on.get("fingerprint") != model_fingerprint(denoiser):
        raise ValueError(
            f"policy {directory} was trained on another model ({trained_on.get('spec')}) than "
            f"{cfg.model}: fine-tune it on its own model (rldiff evaluate --policy measures a "
            "transfer)"
        )
    old = config_from_json(spec["training"]["config"])
    keep = ("experts", "hidden", "base_expert", "step_range", "budgets", "guidance", "cost_per_nfe")
    schedules = spec["base_schedule"]["schedules"]
    if isinstance(schedules, dict):
        schedules = {int(b): sigmas for b, sigmas in schedules.items()}
    return dataclasses.replace(
        cfg,
        **{k: getattr(old, k) for k in keep},
        base_schedules=schedules,
        init_policy=str(directory),
    )


def traffic_config(cfg: TrainConfig, denoiser) -> TrainConfig:
    """``cfg`` with ``conditions`` read from the traffic log ``cfg.conditions_from`` (unchanged
    without one, or when they are set already: a resumed run keeps its own). The log must hold
    requests of this model at budgets ``cfg`` trains and guidance within its range."""
    if not cfg.conditions_from or cfg.conditions:
        return cfg
    from rldiff.data.traffic import traffic_conditions

    found = traffic_conditions(
        cfg.conditions_from,
        cfg.model,
        budgets=cfg.budgets,
        guidance_range=(min(cfg.guidance), max(cfg.guidance)),
        num_classes=denoiser.num_classes,
    )
    print(f"training conditions from {cfg.conditions_from}: {found.describe()}")
    return dataclasses.replace(cfg, conditions=found.entries())


def single_expert_config(cfg: TrainConfig) -> TrainConfig:
    """The ``ppo-single`` ablation of ``cfg``: the base expert alone (no router), same base schedule,
    budgets and reward. Its env step is one sampler step, where ``cfg``'s is half of one (a router
    turn, then an expert turn), so half the env steps per iteration give both the same denoiser
    work per iteration."""
    half = max(1, cfg.train_batch_size // 2)
    return dataclasses.replace(
        cfg,
        experts=(cfg.base_expert,),
        train_batch_size=half,
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
        guidance=tuple(cfg.guidance),
        reference_steps=cfg.reference_steps,
        cache=Path(cfg.cache),
    )
    return dataclasses.replace(base, **(overrides or {}))


def base_schedules(cfg: TrainConfig, ev: EvaluateConfig, denoiser) -> list[dict]:
    """Each global solver's own schedule per training budget and guidance, from the evaluation
    protocol's cache (computed there and then on first use: minutes on the UNet): the experts step
    around their own, and the best per (budget, guidance), the conditional table, is what the
    reward compares against."""
    from rldiff.evaluation.parallel import use_tasks
    from rldiff.evaluation.protocol import guidance_schedules

    train = seed_set(ev, denoiser, 0, ev.n_train, "train")
    found = guidance_schedules(ev, denoiser, train, use_tasks(ev.ray, denoiser))
    return [
        {
            "solver": s,
            "budget": b,
            "guidance": g,
            "sigmas": v["sigmas"],
            "train_rmse": v["train_rmse"],
        }
        for (s, b, g), v in sorted(found.items())
    ]


def _train(cfg: TrainConfig, out: Path, checkpoint: Path | None) -> dict:
    """Trains to ``cfg.iterations`` (``rldiff.rl.loop``); returns the last iteration's summary and
    its checkpoint."""
    algo = start_algorithm(cfg, checkpoint)
    if checkpoint is None:
        if note := warm_start_note(cfg):
            print(note)
    else:
        print(f"resumed from {checkpoint} at iteration {algo.iteration}")
    log = RunLog(out, algo.iteration)
    saved, seconds, row, ran = checkpoint, [], {}, []
    try:
        for row, due in iterations(algo, cfg):
            seconds.append(row[SECONDS])
            ran.append(row["iteration"])
            log(row)
            if due:
                saved = save_checkpoint(algo, out / "checkpoints")
        if saved is None:  # iterations=0 on a fresh run: export the untrained policy
            saved = save_checkpoint(algo, out / "checkpoints")
    finally:
        log.close()
        algo.stop()
    return {
        "iteration": algo.iteration,
        "iterations_run": ran,  # in this call; progress.jsonl has every one since iteration 1
        "checkpoint": str(saved),
        "seconds_per_iteration": sum(seconds) / len(seconds) if seconds else None,
        "final": row,
    }


def evaluate_policies(ev: EvaluateConfig, policies: dict[str, str], denoiser) -> list[dict]:
    """The protocol with the learned policies (name -> exported directory) beside every
    baseline, plus ``schedules.png`` of the main one (``moe``)."""
    from rldiff.evaluation.protocol import run_evaluation

    paths = {name: str(Path(p).resolve()) for name, p in policies.items()}
    extra = [
        PolicySpec(name, "learned", "router", b, path=path)
        for name, path in paths.items()
        for b in ev.budgets
    ]
    rows = run_evaluation(ev, extra_specs=extra)
    policy = LearnedPolicy.load(paths[LEARNED_NAME], name=LEARNED_NAME)
    plot_schedules(chosen_schedules(policy, ev, denoiser), ev.out / "schedules.png")
    return [r for r in rows if r["family"] == "learned"]


def evaluate_on_traffic(
    ev: EvaluateConfig, cfg: TrainConfig, policies: dict[str, str], denoiser
) -> dict:
    """The new policy (``moe``), the initial one (``--init-policy``) and the conditional table
    under the traffic's conditions on held-out seeds (``rldiff.evaluation.traffic``)."""
    from rldiff.evaluation.traffic import NEW, OLD, TABLE, compare_on_traffic, write_traffic_report

    specs = {NEW: PolicySpec(NEW, "learned", "router", 0, path=policies[LEARNED_NAME])}
    if INITIAL_NAME in policies:
        specs[OLD] = PolicySpec(OLD, "learned", "router", 0, path=policies[INITIAL_NAME])
    if (ev.out / "table.json").exists():
        specs[TABLE] = PolicySpec(TABLE, "table", "table", 0, path=str(ev.out / "table.json"))
    result = compare_on_traffic(ev, denoiser, cfg.conditions, specs)
    print(write_traffic_report(ev.out, result))
    return {k: v for k, v in result.items() if k in ("rmse", "ratios")}


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
        if f.name not in keep | {"base_schedules", "conditions"}
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
    if isinstance(data.get("base_schedules"), dict):
        data["base_schedules"] = {int(b): s for b, s in data["base_schedules"].items()}
    return TrainConfig(**data)
