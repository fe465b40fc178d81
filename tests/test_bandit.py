"""The epsilon-greedy bandit router: learns the better arm, respects budgets, saves and loads."""

import numpy as np
import pytest
import torch

from rldiff.baselines.bandit import BanditPolicy, train_bandit
from rldiff.core.denoisers import Condition
from rldiff.core.routing import BaseSchedule
from rldiff.core.sampler import sample
from rldiff.core.schedules import get_schedule
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERT_NAMES, expert_index
from rldiff.data.models import load_model
from rldiff.rl.env import env_defaults, training_references

N_TRAIN = 32


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """The exact GMM and its first N_TRAIN training seeds: (denoiser, reference, noise, cond)."""
    denoiser = load_model("gmm")
    cache = str(tmp_path_factory.mktemp("bandit-cache"))
    cfg = {
        **env_defaults(),
        "model": "gmm",
        "n_train": N_TRAIN,
        "reference_steps": 100,
        "cache": cache,
    }
    reference = training_references(denoiser, cfg)[1.0]
    seeds = list(range(N_TRAIN))
    noise = initial_noise(seeds, tuple(reference.shape[1:]))
    return denoiser, reference, noise, Condition.make([s % 10 for s in seeds], 1.0)


def test_prefers_the_clearly_better_arm(training):
    """Euler vs UniPC at budget 5: UniPC is the greedy arm, by a clear margin, at the steps where
    the arms differ (the first step has no history and the last jumps to D, so there they agree)."""
    bandit = train_bandit(
        *training, [5], BaseSchedule(), rounds=8, epsilon=0.3, experts=["euler", "unipc"]
    )
    assert bandit.arms == [expert_index("euler"), expert_index("unipc")]
    values, counts = bandit.values[0], bandit.counts[0]
    assert (counts > 0).all() and counts.sum() == 8 * 64 * 5  # every sample takes 5 steps
    middle = values[1:4]
    assert (middle.argmax(1) == 1).all() and (middle[:, 1] > middle[:, 0] + 0.1).all()


def test_greedy_policy_respects_budgets_and_round_trips(training, tmp_path):
    denoiser, reference, noise, cond = training
    budgets = [3, 5, 8]
    base = BaseSchedule.make({b: get_schedule("karras", b, denoiser.noise_table) for b in budgets})
    bandit = train_bandit(denoiser, reference, noise, cond, budgets, base, rounds=3, epsilon=0.2)
    budget = torch.tensor([3, 5, 8, 8, 5, 3, 3, 5] * 2)
    run = sample(denoiser, bandit, noise[:16], cond[:16], budget)
    assert (run.nfe <= budget).all() and (run.nfe >= 1).all()
    assert all(r.confidence is not None for r in run.steps)
    assert run.steps[0].confidence[0] == pytest.approx(1 - 0.2 + 0.2 / len(EXPERT_NAMES))

    b, step = bandit.contexts([4, 10, 8], [0, 20, 7])  # the nearest trained budget, last row
    assert b.tolist() == [0, 2, 2] and step.tolist() == [0, 7, 7]

    bandit.save(tmp_path / "bandit.json")
    loaded = BanditPolicy.load(tmp_path / "bandit.json")
    assert loaded.name == "bandit" and loaded.arms == bandit.arms
    np.testing.assert_array_equal(loaded.values, bandit.values)
    assert all(torch.equal(loaded.base.schedules[b], s) for b, s in base.schedules.items())
    again = sample(denoiser, loaded, noise[:16], cond[:16], budget)
    assert torch.equal(again.x0, run.x0) and torch.equal(again.nfe, run.nfe)
    for a, b in zip(run.steps, again.steps, strict=True):
        assert torch.equal(a.expert, b.expert) and torch.equal(a.sigma_next, b.sigma_next)
