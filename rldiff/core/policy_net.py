"""One learned module's policy network as plain torch, rebuilt from JSON and safetensors.

The shape is that of RLlib's default PPO module's actor path (``encoder.actor_encoder`` then
``pi``, with ``DefaultModelConfig``'s layer sizes and activations): an MLP encoder with an
activation after every layer, then an MLP head with an activation between its layers and none at
the end. Its output is the action distribution inputs: a router's logits, or an expert's diagonal
Gaussian as ``[mean, log_std]`` halves with ``log_std`` clamped to ``+-log_std_clip`` as RLlib's
head does. ``NetSpec`` is the architecture (the JSON half); the weights travel as safetensors
under this module's own parameter names (``encoder.<i>.weight``, ``pi.<i>.bias``, ...). No RLlib,
no pickle.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU}
ACTIVATIONS["swish"] = torch.nn.SiLU  # RLlib's other name for it


@dataclass(frozen=True)
class NetSpec:
    """A module's architecture and action bounds, as stored in ``policy.json``."""

    obs_dim: int
    hiddens: tuple[int, ...]  # encoder layer sizes, each followed by ``activation``
    activation: str
    head_hiddens: tuple[int, ...]  # head layer sizes before the output layer
    head_activation: str
    out_dim: int  # logits, or 2 x action dimensions (mean and log-std halves)
    log_std_clip: float | None = None  # None: the outputs are logits, nothing is clamped
    action_low: tuple[float, ...] | None = None  # a Gaussian's action bounds (the mean's [-1, 1])
    action_high: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in (self.activation, self.head_activation):
            if name not in ACTIVATIONS:
                raise ValueError(f"activation {name!r} unknown: known {sorted(ACTIVATIONS)}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> NetSpec:
        tuples = ("hiddens", "head_hiddens", "action_low", "action_high")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields.update({k: tuple(fields[k]) for k in tuples if fields.get(k) is not None})
        return cls(**fields)


class PolicyNet(torch.nn.Module):
    """``forward(obs [b, obs_dim]) -> [b, out_dim]`` action distribution inputs (float32)."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        self.encoder = _mlp([spec.obs_dim, *spec.hiddens], spec.activation, last=True)
        head = [spec.hiddens[-1] if spec.hiddens else spec.obs_dim, *spec.head_hiddens]
        self.pi = _mlp([*head, spec.out_dim], spec.head_activation, last=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.pi(self.encoder(obs))
        if self.spec.log_std_clip is None:
            return out
        mean, log_std = torch.chunk(out, 2, dim=-1)
        clip = self.spec.log_std_clip
        return torch.cat((mean, log_std.clamp(-clip, clip)), dim=-1)

    def save(self, path) -> str:
        """Writes the weights as safetensors; returns the file's sha256."""
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path)
        return file_sha256(path)

    @classmethod
    def load(cls, spec: NetSpec, path, sha256: str | None = None) -> PolicyNet:
        """The network of ``spec`` with the weights in ``path`` (checked against ``sha256``),
        in eval mode, without gradients."""
        if sha256 is not None and file_sha256(path) != sha256:
            raise ValueError(f"{path} is not the weights file policy.json describes (sha256)")
        net = cls(spec)
        net.load_state_dict(load_file(str(path)))  # strict: every name and shape must match
        return net.eval().requires_grad_(False)


def _mlp(sizes: list[int], activation: str, last: bool) -> torch.nn.Sequential:
    """Linear layers over ``sizes`` with ``activation`` between them (and after the last one)."""
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if last or i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return torch.nn.Sequential(*layers)


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
