"""RLlib modules to policy directories: the one place a learned policy crosses from RLlib to data.

``export_policy`` reads each module of an Algorithm checkpoint, rebuilds its actor path as a
``rldiff.core.policy_net.PolicyNet`` (``policy_net_from_module``: RLlib's default PPO module, with the
``DefaultModelConfig`` of ``rldiff.rl.algo.build_config``), checks that both give the same outputs
bit for bit, and writes the directory ``rldiff.baselines.learned.LearnedPolicy`` loads without RLlib.

The way back, for fine-tuning (``rldiff train --init-policy DIR``), is
``rldiff.rl.algo.load_actor_weights``.

Policy directories of format 1 (RLlib module checkpoints under ``modules/``) are converted in place
by ``python -m rldiff.rl.export DIR [DIR ...]``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from rldiff.baselines.learned import ROUTER, write_policy
from rldiff.core.policy_net import NetSpec, PolicyNet
from rldiff.core.routing import OBS_DIM, OBS_LAYOUT_VERSION
from rldiff.core.solvers import EXPERT_NAMES

MODULES_IN_CHECKPOINT = ("learner_group", "learner", "rl_module")
ACTOR_ENCODERS = ("encoder.actor_encoder.net.mlp.", "encoder.encoder.net.mlp.")  # separate, shared
HEAD = "pi.net.mlp."
PROBE_ROWS = 256  # observations both networks must agree on, bit for bit


def export_policy(
    checkpoint_dir, out_dir, train_cfg, base_schedules, summary: dict | None = None
) -> Path:
    """Writes a self-contained policy directory from an Algorithm checkpoint; returns ``out_dir``.

    ``train_cfg`` is the ``TrainConfig`` the checkpoint was trained with, ``base_schedules`` the
    base schedule's ``{budget: sigmas}`` (None: the logSNR split), ``summary`` any training figures
    worth keeping beside the policy (final metrics, iteration, wall time).
    """
    from rldiff.data.models import load_model
    from rldiff.rl.algo import module_ids

    checkpoint_dir = Path(checkpoint_dir)
    ids = module_ids(train_cfg.env_config().get("experts"))
    source = checkpoint_dir.joinpath(*MODULES_IN_CHECKPOINT)
    missing = [m for m in ids if not (source / m).is_dir()]
    if missing:
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no module(s) {missing}")
    nets = {m: policy_net_from_module(_load_module(source / m)) for m in ids}
    cost = train_cfg.cost_per_nfe
    spec = {
        "router": ROUTER if ROUTER in ids else None,
        "experts": [  # in router order: router action j picks experts[j]
            {"name": EXPERT_NAMES[int(m.split("_")[1])], "index": int(m.split("_")[1]), "module": m}
            for m in ids
            if m != ROUTER
        ],
        "base_schedule": {
            "schedules": _schedules_json(base_schedules),
            "step_range": float(train_cfg.step_range),
        },
        "base_expert": train_cfg.base_expert,
        # The trade-off observed at inference: the training cost, or the lowest one trained on.
        "cost_per_nfe": float(min(cost) if isinstance(cost, tuple | list) else cost),
        "budgets": sorted(int(b) for b in train_cfg.budgets),
        "model": model_entry(train_cfg.model, load_model(train_cfg.model)),
        "training": {
            "checkpoint": str(checkpoint_dir.resolve()),
            "config": json.loads(json.dumps(asdict(train_cfg), default=str)),
            **(summary or {}),
        },
    }
    return write_policy(out_dir, nets, spec)


def model_entry(spec: str, denoiser) -> dict:
    """What a policy records of the model it was trained on: its spec and fingerprint, and what
    a transfer to another model must match (sample shape, class count) or should know (the
    noise range)."""
    from rldiff.core.fingerprint import model_fingerprint

    table = denoiser.noise_table
    return {
        "spec": spec,
        "fingerprint": model_fingerprint(denoiser),
        "sample_shape": list(getattr(denoiser, "sample_shape", ()) or ()),
        "num_classes": int(denoiser.num_classes),
        "sigma_range": [float(table.sigma_min), float(table.sigma_max)],
    }


def policy_net_from_module(module) -> PolicyNet:
    """The actor path of a default PPO torch module (encoder, then ``pi``) as a ``PolicyNet`` with
    the same weights; fails unless both give identical outputs on random observations."""
    config = _model_config(module)
    for key in ("free_log_std", "fcnet_use_layernorm", "head_fcnet_use_layernorm"):
        if config.get(key):
            raise ValueError(f"{key}=True modules cannot be exported (PolicyNet has no such part)")
    state = module.state_dict()
    encoder = next((p for p in ACTOR_ENCODERS if any(k.startswith(p) for k in state)), None)
    if encoder is None:
        raise ValueError(f"{type(module).__name__} has no MLP encoder ({ACTOR_ENCODERS})")
    enc, head = _linear_layers(state, encoder), _linear_layers(state, HEAD)
    gaussian = bool(getattr(module.pi, "clip_log_std", False))
    box = getattr(module.action_space, "low", None) is not None
    spec = NetSpec(
        obs_dim=enc[0][1].shape[1],
        hiddens=tuple(w.shape[0] for _, w, _ in enc),
        activation=config.get("fcnet_activation", "tanh"),
        head_hiddens=tuple(w.shape[0] for _, w, _ in head[:-1]),
        head_activation=config.get("head_fcnet_activation", "relu"),
        out_dim=head[-1][1].shape[0],
        log_std_clip=float(module.pi.log_std_clip_param_const) if gaussian else None,
        action_low=tuple(float(v) for v in module.action_space.low) if box else None,
        action_high=tuple(float(v) for v in module.action_space.high) if box else None,
    )
    net = PolicyNet(spec)
    ours = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, (_, weight, bias) in zip(ours, enc + head, strict=True):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    net.eval().requires_grad_(False)
    _check_same_outputs(module, net)
    return net


def _linear_layers(state: dict, prefix: str) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(index, weight, bias)`` of the linear layers under ``prefix``, in order."""
    idx = sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})
    if not idx:
        raise ValueError(f"no layers under {prefix!r} in the module's state dict")
    return [(i, state[f"{prefix}{i}.weight"], state[f"{prefix}{i}.bias"]) for i in idx]


def _model_config(module) -> dict:
    config = getattr(module, "model_config", None) or {}
    return config if isinstance(config, dict) else asdict(config)


def _check_same_outputs(module, net: PolicyNet) -> None:
    x = torch.randn(PROBE_ROWS, net.spec.obs_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = module.forward_inference({Columns.OBS: x})[Columns.ACTION_DIST_INPUTS]
        if not torch.equal(net(x), theirs):
            raise ValueError(f"{type(module).__name__} and its PolicyNet differ: not exported")


def _load_module(path: Path):
    return RLModule.from_checkpoint(str(path.resolve()))  # a relative path fails


def convert_format_1(directory, out_dir=None) -> Path:
    """A format 1 policy directory (RLlib module checkpoints under ``modules/``) rewritten as
    safetensors + ``policy.json`` into ``out_dir`` (default: in place); returns it."""
    directory = Path(directory)
    old = json.loads((directory / "policy.json").read_text())
    if old.get("format") != 1:
        raise ValueError(f"{directory} is not a format 1 policy (format {old.get('format')})")
    if old.get("obs_layout") != OBS_LAYOUT_VERSION or old.get("obs_dim") != OBS_DIM:
        raise ValueError(f"{directory} was trained on another observation layout: retrain it")
    ids = [e["module"] for e in old["experts"]] + ([old["router"]] if old["router"] else [])
    nets = {m: policy_net_from_module(_load_module(directory / "modules" / m)) for m in ids}
    spec = {k: v for k, v in old.items() if k not in ("format", "obs_layout", "obs_dim")}
    spec["base_schedule"] = spec.pop("warm_start")
    return write_policy(out_dir or directory, nets, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert format 1 policy directories in place.")
    parser.add_argument("directories", nargs="+", type=Path)
    for directory in parser.parse_args(argv).directories:
        print(f"converted: {convert_format_1(directory)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _schedules_json(base_schedules):
    """The base schedules as JSON: None, {budget: sigmas}, or own-schedule entries as they are."""
    if base_schedules is None or isinstance(base_schedules, list | tuple):
        return None if base_schedules is None else list(base_schedules)
    return {str(b): [float(s) for s in sigmas] for b, sigmas in base_schedules.items()}
