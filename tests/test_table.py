"""The conditional table and the experts' own schedules: the table policy, the base schedule that
steps each expert around its own schedule, router actions relative to the table, the guidance mix
rule and the oracle's per-sample search."""

import numpy as np
import pytest
import torch

from rldiff.baselines.oracle import oracle_plan
from rldiff.baselines.table import TablePolicy, table_of_entries
from rldiff.config import GUIDANCE_MIX, SearchConfig
from rldiff.core.denoisers import Condition, guidance_for_seeds
from rldiff.core.error import rmse_per_sample
from rldiff.core.policies import FixedSchedulePolicy, PlanPolicy
from rldiff.core.routing import BaseSchedule, BaseSchedulePolicy, routed_experts
from rldiff.core.sampler import Sampling, sample
from rldiff.core.schedules import get_schedule
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import expert_index


def _entries(noise_table):
    """Own schedules at budget 5: unipc best at guidance 1, dpmpp-2m at 7.5; euler everywhere."""
    out = []
    for g, best in ((1.0, "unipc"), (7.5, "dpmpp-2m")):
        for solver, schedule in (
            ("unipc", "karras"),
            ("dpmpp-2m", "time-uniform"),
            ("euler", "logsnr-uniform"),
        ):
            sigmas = get_schedule(schedule, 5, noise_table).tolist()
            rmse = 0.1 if solver == best else 0.2
            out.append(
                {"solver": solver, "budget": 5, "guidance": g, "sigmas": sigmas, "train_rmse": rmse}
            )
    return out


@pytest.fixture
def batch(digits_gmm):
    seeds = list(range(8))
    cond = Condition.make([s % 10 for s in seeds], [1.0, 7.5] * 4)
    return digits_gmm, initial_noise(seeds, digits_gmm.sample_shape, torch.float64), cond


def test_table_policy_is_each_conditions_solver_on_its_own_schedule(batch):
    denoiser, noise, cond = batch
    entries = _entries(denoiser.noise_table)
    table = table_of_entries(entries)
    assert table.entry(5, 1.0).solver == "unipc" and table.entry(5, 7.5).solver == "dpmpp-2m"
    assert table.entry(5, 5.0).solver == "dpmpp-2m"  # nearest scale
    with pytest.raises(KeyError, match="no budget 4"):
        table.entry(4, 1.0)
    run = sample(denoiser, table, noise, cond, 5)
    for g, solver, schedule in ((1.0, "unipc", "karras"), (7.5, "dpmpp-2m", "time-uniform")):
        rows = cond.guidance == g
        alone = FixedSchedulePolicy(solver, get_schedule(schedule, 5, denoiser.noise_table))
        theirs = sample(denoiser, alone, noise[rows], cond[rows], 5)
        torch.testing.assert_close(run.x0[rows], theirs.x0, rtol=0, atol=1e-12)


def test_experts_step_around_their_own_schedules_and_action_zero_is_the_table(batch, tmp_path):
    denoiser, noise, cond = batch
    base = BaseSchedule.make(_entries(denoiser.noise_table))
    obs = Sampling(denoiser, noise, cond, 5).observe()
    unipc, dpm, euler = (expert_index(n) for n in ("unipc", "dpmpp-2m", "euler"))
    table = torch.where(cond.guidance == 1.0, unipc, dpm)
    assert torch.equal(base.table_experts(obs), table)
    experts = [unipc, dpm, euler]
    assert torch.equal(routed_experts(obs, np.zeros(8), experts, base), table)
    shifted = routed_experts(obs, np.ones(8), experts, base)  # the next expert after the table's
    assert torch.equal(shifted, torch.where(cond.guidance == 1.0, dpm, euler))
    for expert, schedule in ((unipc, "karras"), (euler, "logsnr-uniform")):
        nxt = base.sigma_next(obs, torch.full((8,), expert))
        expected = get_schedule(schedule, 5, denoiser.noise_table)[1]
        torch.testing.assert_close(nxt, torch.full((8,), float(expected), dtype=torch.float64))
    ancestral = base.sigma_next(obs, torch.full((8,), expert_index("euler-ancestral")))
    torch.testing.assert_close(ancestral, base.sigma_next(obs))  # no own schedule: the table's
    # zero actions reproduce the table exactly: reward 0 means "as good as the table"
    table_policy = table_of_entries(_entries(denoiser.noise_table))
    ours = sample(denoiser, BaseSchedulePolicy("unipc", base), noise, cond, 5)
    theirs = sample(denoiser, table_policy, noise, cond, 5)
    torch.testing.assert_close(ours.x0, theirs.x0, rtol=0, atol=1e-12)
    table_policy.save(tmp_path / "table.json")
    again = TablePolicy.load(tmp_path / "table.json")
    assert again.entries == table_policy.entries


def test_the_guidance_mix_meets_every_class_evenly():
    seeds = range(1_000_000, 1_000_512)
    scales = guidance_for_seeds(seeds, GUIDANCE_MIX)
    assert [scales.count(g) for g in GUIDANCE_MIX] == [128] * 4
    pairs = {(s % 10, g) for s, g in zip(seeds, scales, strict=True)}
    assert len(pairs) == 10 * len(GUIDANCE_MIX)
    assert guidance_for_seeds([3, 17], 2.5) == [2.5, 2.5]


def test_the_oracle_never_loses_to_its_best_candidate(batch):
    denoiser, noise, cond = batch
    entries = _entries(denoiser.noise_table)
    candidates = {(e["solver"], e["guidance"]): e["sigmas"] for e in entries}
    fine = FixedSchedulePolicy("unipc", get_schedule("karras", 60, denoiser.noise_table))
    reference = sample(denoiser, fine, noise, cond, 60).x0
    search = SearchConfig(rounds=1)
    experts, sigmas, best = oracle_plan(denoiser, 5, candidates, noise, cond, reference, search, 2)
    refined = rmse_per_sample(
        sample(denoiser, PlanPolicy(experts, sigmas), noise, cond, 5).x0, reference
    )
    assert (refined <= best + 1e-12).all() and (refined < best - 1e-6).any()
    one = {k: v for k, v in candidates.items() if k[0] == "unipc"}
    _, _, unipc_only = oracle_plan(denoiser, 5, one, noise, cond, reference, search, 0)
    assert (best <= unipc_only + 1e-12).all()  # the best of three candidates per sample
