"""The trained router + experts as a ``Policy``, outside RLlib: no Algorithm, no Ray, no env.

A policy directory (written by ``export_policy``) holds ``modules/<module_id>/`` (RLlib's own
module checkpoint, loaded with ``RLModule.from_checkpoint``) and ``policy.json`` with everything
else needed to act: the experts in router order, the observation layout, the warm start (base
schedule per budget and step range), the cost per NFE the policy observes, the model it was trained
on and a training summary. Inference is deterministic: the router's argmax, the Gaussian's mean.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rldiff.env import OBS_DIM, WarmStart, decision_from_actions, observation_vector
from rldiff.policies import Decision, Observation
from rldiff.solvers import EXPERT_NAMES, expert_index

FORMAT_VERSION = 1
# Bump when rldiff.env.observation_vector changes meaning: a policy trained on another layout
# would act on the wrong features without any error.
OBS_LAYOUT_VERSION = 1
ROUTER = "router"  # the module ids of rldiff.algo, repeated here so loading needs no RLlib config
MODULES_IN_CHECKPOINT = ("learner_group", "learner", "rl_module")


class LearnedPolicy:
    """Router (``Discrete(len(experts))``) + one Box module per expert; ``act`` is batched."""

    def __init__(self, spec: dict, modules: dict, name: str = "moe", cost_per_nfe=None):
        self.spec, self.name = spec, name
        self.experts = [e["index"] for e in spec["experts"]]  # router action j -> global index
        self.router = modules.get(spec["router"]) if spec["router"] else None
        self.expert_modules = {e["index"]: modules[e["module"]] for e in spec["experts"]}
        warm = spec["warm_start"]
        self.base = WarmStart.make(warm["schedules"], warm["step_range"])
        self.cost_per_nfe = float(spec["cost_per_nfe"] if cost_per_nfe is None else cost_per_nfe)

    @classmethod
    def load(cls, directory, name: str = "moe", cost_per_nfe: float | None = None) -> LearnedPolicy:
        """Reads ``policy.json`` and the modules under ``directory`` (``cost_per_nfe`` overrides
        the trade-off the policy observes; it must lie in the range it was trained on)."""
        from ray.rllib.core.rl_module.rl_module import RLModule

        directory = Path(directory).resolve()  # RLModule.from_checkpoint fails on relative paths
        path = directory / "policy.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: not an exported policy directory")
        spec = json.loads(path.read_text())
        _check_compatible(spec, path)
        ids = [e["module"] for e in spec["experts"]] + ([spec["router"]] if spec["router"] else [])
        modules = {m: RLModule.from_checkpoint(str(directory / "modules" / m)) for m in ids}
        for module in modules.values():
            module.eval()
        return cls(spec, modules, name=name, cost_per_nfe=cost_per_nfe)

    def observe(self, obs: Observation) -> torch.Tensor:
        """The modules' input ``[b, OBS_DIM]``: the env's features at this policy's trade-off."""
        vec = observation_vector(obs, self.base.sigma_next(obs), self.cost_per_nfe)
        return torch.from_numpy(vec)

    def act(self, obs: Observation) -> Decision:
        x = self.observe(obs)
        b = len(x)
        with torch.no_grad():
            if self.router is None:  # one expert: no routing decision to make
                choice, confidence = torch.zeros(b, dtype=torch.long), torch.ones(b)
            else:
                probs = torch.softmax(_dist_inputs(self.router, x).double(), dim=1)
                confidence, choice = probs.max(dim=1)
            experts = torch.tensor(self.experts, dtype=torch.long)[choice]
            actions = torch.zeros(b, 2, dtype=torch.float64)
            for k in experts.unique().tolist():
                rows = experts == k
                actions[rows] = expert_mean(self.expert_modules[k], x[rows]).double()
        decision = decision_from_actions(obs, experts, actions.numpy(), self.base)
        decision.confidence = confidence.to(torch.float64)
        return decision


def expert_mean(module, x: torch.Tensor) -> torch.Tensor:
    """The expert's deterministic action: the Gaussian's mean (first half of its outputs), mapped
    from the normalised [-1, 1] range to the action bounds and clipped, as RLlib's env runner does
    (``unsquash_action``) before the env sees an action."""
    out = _dist_inputs(module, x)
    mean = out[:, : out.shape[1] // 2]
    low = torch.as_tensor(module.action_space.low, dtype=mean.dtype)
    high = torch.as_tensor(module.action_space.high, dtype=mean.dtype)
    return torch.minimum(torch.maximum(low + (mean + 1) * (high - low) / 2, low), high)


def router_choice(module, x: torch.Tensor) -> torch.Tensor:
    """The router's deterministic choice (its logits' argmax), as ``LearnedPolicy`` makes it."""
    return _dist_inputs(module, x).argmax(dim=1)


def _dist_inputs(module, x: torch.Tensor) -> torch.Tensor:
    from ray.rllib.core.columns import Columns

    return module.forward_inference({Columns.OBS: x})[Columns.ACTION_DIST_INPUTS]


def _check_compatible(spec: dict, path: Path) -> None:
    problems = []
    if spec.get("format") != FORMAT_VERSION:
        problems.append(f"format {spec.get('format')} (this code reads {FORMAT_VERSION})")
    if spec.get("obs_layout") != OBS_LAYOUT_VERSION or spec.get("obs_dim") != OBS_DIM:
        problems.append(
            f"observation layout v{spec.get('obs_layout')}/{spec.get('obs_dim')} features "
            f"(this code builds v{OBS_LAYOUT_VERSION}/{OBS_DIM})"
        )
    for e in spec.get("experts", []):
        if e["name"] not in EXPERT_NAMES or expert_index(e["name"]) != e["index"]:
            problems.append(f"expert {e['name']!r} is not solver #{e['index']} here")
    if problems:
        raise ValueError(f"policy {path} does not fit this rldiff: {'; '.join(problems)}")


def export_policy(
    checkpoint_dir, out_dir, train_cfg, base_schedules, summary: dict | None = None
) -> Path:
    """Writes a self-contained policy directory from an Algorithm checkpoint; returns ``out_dir``.

    ``train_cfg`` is the ``TrainConfig`` the checkpoint was trained with, ``base_schedules`` the
    warm start's ``{budget: sigmas}`` (None: the logSNR split), ``summary`` any training figures
    worth keeping beside the policy (final metrics, iteration, wall time).
    """
    from rldiff.algo import module_ids
    from rldiff.fingerprint import model_fingerprint
    from rldiff.models import load_model

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    env_config = train_cfg.env_config()
    ids = module_ids(env_config.get("experts"))
    source = checkpoint_dir.joinpath(*MODULES_IN_CHECKPOINT)
    missing = [m for m in ids if not (source / m).is_dir()]
    if missing:
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no module(s) {missing}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for m in ids:
        shutil.copytree(source / m, tmp / "modules" / m)
    experts = [m for m in ids if m != ROUTER]
    cost = train_cfg.cost_per_nfe
    spec = {
        "format": FORMAT_VERSION,
        "obs_layout": OBS_LAYOUT_VERSION,
        "obs_dim": OBS_DIM,
        "router": ROUTER if ROUTER in ids else None,
        "experts": [  # in router order: router action j picks experts[j]
            {"name": EXPERT_NAMES[int(m.split("_")[1])], "index": int(m.split("_")[1]), "module": m}
            for m in experts
        ],
        "warm_start": {
            "schedules": None
            if base_schedules is None
            else {str(b): [float(s) for s in sigmas] for b, sigmas in base_schedules.items()},
            "step_range": float(train_cfg.step_range),
        },
        "base_expert": train_cfg.base_expert,
        # The trade-off observed at inference: the training cost, or the lowest one trained on.
        "cost_per_nfe": float(min(cost) if isinstance(cost, tuple | list) else cost),
        "budgets": sorted(int(b) for b in train_cfg.budgets),
        "model": {
            "spec": train_cfg.model,
            "fingerprint": model_fingerprint(load_model(train_cfg.model)),
        },
        "training": {
            "checkpoint": str(checkpoint_dir.resolve()),
            "config": json.loads(json.dumps(asdict(train_cfg), default=str)),
            **(summary or {}),
        },
    }
    (tmp / "policy.json").write_text(json.dumps(spec, indent=2, default=_json_default))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
