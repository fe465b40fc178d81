"""Imports point down: the core, the baselines and the service act without RLlib.

A fresh interpreter with ``ray.rllib`` made unimportable imports the routing semantics, the core
modules, the bandit, the learned policy and the service, then samples the mixture model with a
bandit and with a learned policy loaded from a directory written here (random networks, the
shape a trained export has). Any ``import ray.rllib`` on these paths, at import time or while
acting, fails the run.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CORE = [  # torch only: not even Ray
    "rldiff.core.routing",
    "rldiff.core.noise",
    "rldiff.core.seeds",
    "rldiff.core.solvers",
    "rldiff.core.schedules",
    "rldiff.core.denoisers",
    "rldiff.core.gmm",
    "rldiff.core.sampler",
    "rldiff.core.policies",
    "rldiff.core.fingerprint",
    "rldiff.core.error",
    "rldiff.data.reference",
    "rldiff.evaluation.quality",
    "rldiff.core.policy_net",
    "rldiff.baselines.bandit",
    "rldiff.baselines.learned",
    "rldiff.baselines.specs",
    "rldiff.baselines.global_schedule",
    "rldiff.config",
]
SERVING = [  # Ray Serve, never RLlib
    "rldiff.serving.app",
    "rldiff.serving.catalog",
    "rldiff.serving.engine",
    "rldiff.serving.schemas",
]

SCRIPT = """
import importlib
import sys

sys.modules["ray.rllib"] = None  # any import of ray.rllib or below raises ImportError

for name in CORE:
    importlib.import_module(name)
assert "ray" not in sys.modules, "a core module imports Ray"
for name in SERVING:
    importlib.import_module(name)

import numpy as np
import torch

from rldiff.baselines.bandit import BanditPolicy
from rldiff.core.denoisers import Condition
from rldiff.core.fingerprint import model_fingerprint
from rldiff.baselines.learned import LearnedPolicy, write_policy
from rldiff.data.models import load_model
from rldiff.core.policy_net import NetSpec, PolicyNet
from rldiff.core.routing import OBS_DIM, BaseSchedule
from rldiff.core.sampler import sample
from rldiff.core.seeds import initial_noise
from rldiff.serving.catalog import Catalog
from rldiff.core.solvers import expert_index

torch.set_num_threads(1)
torch.manual_seed(0)
denoiser = load_model("gmm")
seeds = list(range(4_000_000, 4_000_008))
noise = initial_noise(seeds, (1, 16, 16))
cond = Condition.make([s % 10 for s in seeds])
budget = torch.tensor([4, 6] * 4)


def run(policy):
    result = sample(denoiser, policy, noise, cond, budget, seeds)
    assert (result.nfe <= budget).all() and torch.isfinite(result.x0).all(), policy.name
    return result


bandit = BanditPolicy.empty([4, 6], BaseSchedule(), epsilon=0.1, experts=["euler", "unipc"])
bandit.values = np.random.default_rng(0).normal(size=bandit.values.shape)
run(bandit)


def net(out_dim, gaussian):
    bounds = (-1.0, -1.0) if gaussian else None
    return PolicyNet(
        NetSpec(
            obs_dim=OBS_DIM,
            hiddens=(16, 16),
            activation="tanh",
            head_hiddens=(),
            head_activation="relu",
            out_dim=out_dim,
            log_std_clip=20.0 if gaussian else None,
            action_low=bounds,
            action_high=None if bounds is None else (1.0, 1.0),
        )
    )


experts = [(n, expert_index(n)) for n in ("euler", "unipc")]
nets = {"router": net(len(experts), False), **{f"expert_{k}": net(4, True) for _, k in experts}}
spec = {
    "router": "router",
    "experts": [{"name": n, "index": k, "module": f"expert_{k}"} for n, k in experts],
    "base_schedule": {"schedules": None, "step_range": 1.5},
    "base_expert": "unipc",
    "cost_per_nfe": 0.0,
    "budgets": [4, 6],
    "model": {"spec": "gmm", "fingerprint": model_fingerprint(denoiser)},
    "training": {"untrained": True, "iteration": 0},
}
write_policy(ROOT + "/run/policy", nets, spec)
loaded = run(LearnedPolicy.load(ROOT + "/run/policy"))
in_memory = run(LearnedPolicy(spec, nets))
assert torch.equal(loaded.x0, in_memory.x0) and torch.equal(loaded.nfe, in_memory.nfe)

catalog = Catalog("gmm", denoiser, ROOT)
assert catalog.swap("run/policy"), catalog.last_swap
served = run(catalog.resolve("learned", 4)[2])
assert torch.equal(served.x0, loaded.x0)
assert not [m for m in sys.modules if m.startswith("ray.rllib.")]
print("acted without RLlib")
"""


def test_core_baselines_and_service_act_without_rllib(tmp_path):
    code = f"CORE = {CORE!r}\nSERVING = {SERVING!r}\nROOT = {str(tmp_path)!r}\n"
    code += textwrap.dedent(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "acted without RLlib" in done.stdout
