"""The trained router + experts as a ``Policy``, outside RLlib: no Algorithm, no Ray, no pickle.

A policy directory (written by ``write_policy``; ``rldiff.rl.export`` converts RLlib
checkpoints into one) holds ``<module_id>.safetensors`` per module and ``policy.json`` with
everything else needed to act: each module's architecture and action bounds (``modules``, see
``rldiff.core.policy_net.NetSpec``), the experts in router order, the observation layout, the base
schedule (per budget, and the step range), the cost per NFE the policy observes, the model it was
trained on and a training summary. Inference is deterministic: the router's argmax, the Gaussian's
mean.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from rldiff.core.policies import Decision, Observation
from rldiff.core.policy_net import NetSpec, PolicyNet
from rldiff.core.routing import (
    OBS_DIM,
    OBS_LAYOUT_VERSION,
    BaseSchedule,
    decision_from_actions,
    observation_vector,
    routed_experts,
)
from rldiff.core.solvers import EXPERT_NAMES, expert_index

FORMAT_VERSION = 2  # 1: RLlib module checkpoints (pickle), no longer loaded
ROUTER = (
    "router"  # the module ids of rldiff.rl.algo, repeated here so loading needs no RLlib config
)


class LearnedPolicy:
    """Router (``len(experts)`` logits) + one Gaussian network per expert; ``act`` is batched."""

    def __init__(self, spec: dict, nets: dict, name: str = "moe", cost_per_nfe=None):
        self.spec, self.name = spec, name
        self.experts = [e["index"] for e in spec["experts"]]  # router action j -> global index
        self.router = nets.get(spec["router"]) if spec["router"] else None
        self.expert_modules = {e["index"]: nets[e["module"]] for e in spec["experts"]}
        base = spec["base_schedule"]
        self.base = BaseSchedule.make(base["schedules"], base["step_range"])
        self.cost_per_nfe = float(spec["cost_per_nfe"] if cost_per_nfe is None else cost_per_nfe)

    @classmethod
    def load(cls, directory, name: str = "moe", cost_per_nfe: float | None = None) -> LearnedPolicy:
        """Reads ``policy.json`` and the weights under ``directory`` (``cost_per_nfe`` overrides
        the trade-off the policy observes; it must lie in the range it was trained on)."""
        directory = Path(directory)
        path = directory / "policy.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: not an exported policy directory")
        spec = json.loads(path.read_text())
        _check_compatible(spec, directory)
        nets = {
            m: PolicyNet.load(
                NetSpec.from_json(entry), directory / entry["weights"], entry["sha256"]
            )
            for m, entry in spec["modules"].items()
        }
        return cls(spec, nets, name=name, cost_per_nfe=cost_per_nfe)

    def observe(self, obs: Observation) -> torch.Tensor:
        """The networks' input ``[b, OBS_DIM]``: the env's features at this policy's trade-off."""
        vec = observation_vector(obs, self.base.sigma_next(obs), self.cost_per_nfe)
        return torch.from_numpy(vec)

    def act(self, obs: Observation) -> Decision:
        x = self.observe(obs)
        b = len(x)
        with torch.no_grad():
            if self.router is None:  # one expert: no routing decision to make
                choice, confidence = torch.zeros(b, dtype=torch.long), torch.ones(b)
            else:
                probs = torch.softmax(self.router(x).double(), dim=1)
                confidence, choice = probs.max(dim=1)
            experts = routed_experts(obs, choice, list(self.experts), self.base)
            actions = torch.zeros(b, 2, dtype=torch.float64)
            for k in experts.unique().tolist():
                rows = experts == k
                actions[rows] = expert_mean(self.expert_modules[k], x[rows]).double()
        decision = decision_from_actions(obs, experts, actions.numpy(), self.base)
        decision.confidence = confidence.to(torch.float64)
        return decision


def expert_mean(net: PolicyNet, x: torch.Tensor) -> torch.Tensor:
    """The expert's deterministic action: the Gaussian's mean (first half of its outputs), mapped
    from the normalised [-1, 1] range to the action bounds and clipped, as RLlib's env runner does
    (``unsquash_action``) before the env sees an action."""
    out = net(x)
    mean = out[:, : out.shape[1] // 2]
    low = torch.as_tensor(net.spec.action_low, dtype=mean.dtype)
    high = torch.as_tensor(net.spec.action_high, dtype=mean.dtype)
    return torch.minimum(torch.maximum(low + (mean + 1) * (high - low) / 2, low), high)


def write_policy(out_dir, nets: dict[str, PolicyNet], spec: dict) -> Path:
    """Writes a policy directory: ``nets`` (module id -> network) as safetensors and ``spec``
    (``router``, ``experts``, ``base_schedule``, ``base_expert``, ``cost_per_nfe``, ``budgets``,
    ``model``, ``training``) completed with the format, the observation layout and ``modules`` as
    ``policy.json``. Replaces ``out_dir`` whole (written beside it first); returns it."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    modules = {}
    for m, net in nets.items():
        sha256 = net.save(tmp / f"{m}.safetensors")
        modules[m] = {"weights": f"{m}.safetensors", "sha256": sha256, **net.spec.to_json()}
    head = {"format": FORMAT_VERSION, "obs_layout": OBS_LAYOUT_VERSION, "obs_dim": OBS_DIM}
    full = {**head, **spec, "modules": modules}
    _check_compatible(full, tmp)
    (tmp / "policy.json").write_text(json.dumps(full, indent=2, default=_json_default))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _check_compatible(spec: dict, directory: Path) -> None:
    if spec.get("format") == 1:
        raise ValueError(_old_format_message(spec, directory))
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
    used = [e["module"] for e in spec.get("experts", [])] + [spec.get("router")]
    missing = [m for m in used if m is not None and m not in spec.get("modules", {})]
    if missing:
        problems.append(f"no network for module(s) {missing}")
    for m, entry in spec.get("modules", {}).items():
        if entry.get("obs_dim") != OBS_DIM:
            problems.append(f"module {m} reads {entry.get('obs_dim')} features, not {OBS_DIM}")
    if problems:
        raise ValueError(f"policy {directory} does not fit this rldiff: {'; '.join(problems)}")


def _old_format_message(spec: dict, directory: Path) -> str:
    iteration = spec.get("training", {}).get("iteration", "N")
    return (
        f"policy {directory} holds RLlib module checkpoints (policy format 1), which this rldiff "
        "no longer loads: policies are now safetensors + policy.json. Convert it in place with "
        f"`python -m rldiff.rl.export {directory}` (needs Ray RLlib installed), or re-export "
        f"it from its training run's checkpoints with `rldiff train --out RUN --resume "
        f"--iterations {iteration} --no-evaluate` (RUN: the run's --out directory)."
    )


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
