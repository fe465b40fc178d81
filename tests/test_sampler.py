"""The per-sample sampler: batching is invisible, NFE accounting is exact, budgets are hard caps."""

import pytest
import torch

from rldiff.core.denoisers import Condition
from rldiff.core.policies import Decision, FixedSchedulePolicy
from rldiff.core.sampler import MAX_STEPS, sample
from rldiff.core.schedules import get_schedule, karras
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERT_NAMES, EXPERTS, expert_index

F64 = torch.float64
UNLIMITED = 10**6


class PlanPolicy:
    """Each sample follows its own plan: a list of (expert name, sigma_next, eta) per step.

    ``obs.index`` (the batch position) selects the plan, so a plan list of one runs a sample alone
    with exactly the choices it gets inside the batch. Records every call in ``log``."""

    name = "plan"

    def __init__(self, plans, log=None, confidence=False):
        self.plans, self.log, self.confidence = plans, log, confidence

    def act(self, obs):
        if self.log is not None:
            self.log.append(("act", len(obs.index)))
        rows = [
            self.plans[i][s] for i, s in zip(obs.index.tolist(), obs.step.tolist(), strict=True)
        ]
        expert = torch.tensor([expert_index(e) for e, _, _ in rows])
        conf = torch.linspace(0.5, 0.9, len(rows), dtype=F64) if self.confidence else None
        return Decision(
            expert,
            torch.tensor([s for _, s, _ in rows], dtype=F64),
            torch.tensor([n for _, _, n in rows], dtype=F64),
            conf,
        )


class Counting:
    """Wraps a denoiser and logs each call's batch size and sigmas."""

    def __init__(self, inner, log):
        self.inner, self.noise_table, self.log = inner, inner.noise_table, log

    def __call__(self, x, sigma, cond):
        self.log.append(("call", len(x)))
        return self.inner(x, sigma, cond)


def plan(sigmas, experts, eta=0.0):
    """A plan over ``sigmas`` (first = sigma_max, last = 0); ``experts`` is one name or one per step."""
    sigmas = sigmas.tolist()
    steps = len(sigmas) - 1
    names = [experts] * steps if isinstance(experts, str) else list(experts)
    assert len(names) == steps
    return [
        (name, nxt, eta if EXPERTS[expert_index(name)].stochastic else 0.0)
        for name, nxt in zip(names, sigmas[1:], strict=True)
    ]


def expected_nfe(p) -> int:
    return sum(1 + (EXPERTS[expert_index(e)].extra_nfe if s > 0 else 0) for e, s, _ in p)


def mixed_plans(noise_map):
    """Five samples, five schedules of different lengths, every expert, noise in some steps."""
    names = EXPERT_NAMES

    def cycle(offset, n):  # expert = f(sample index, step)
        return [names[(offset + 2 * k) % len(names)] for k in range(n)]

    s0 = get_schedule("karras", 5, noise_map)
    s1 = get_schedule("logsnr-uniform", 7, noise_map)
    s2 = get_schedule("time-uniform", 4, noise_map)
    s3 = get_schedule("karras", 9, noise_map)
    s4 = get_schedule("logsnr-uniform", 3, noise_map)
    return [
        plan(s0, cycle(0, 5), eta=0.7),
        plan(s1, ["unipc"] * 3 + ["euler-ancestral"] + ["unipc"] * 3, eta=0.8),
        plan(s2, "heun"),
        plan(s3, cycle(4, 9), eta=1.0),
        plan(s4, ["euler-ancestral", "dpmpp-2m", "heun"], eta=0.5),
    ]


def test_batch_equals_each_sample_alone(digits_gmm):
    plans = mixed_plans(digits_gmm.noise_table)
    seeds = [11, 22, 33, 44, 55]
    b = len(seeds)
    noise = initial_noise(seeds, digits_gmm.sample_shape, F64)
    cond = Condition.make([-1, 3, 7, 0, 9], [1.0, 1.0, 2.5, 0.5, 1.0])
    budget = torch.tensor([50, 50, 50, 50, 50])
    batch = sample(digits_gmm, PlanPolicy(plans), noise, cond, budget, seeds)
    assert torch.isfinite(batch.x0).all()
    worst = 0.0
    for i in range(b):
        alone = sample(
            digits_gmm,
            PlanPolicy([plans[i]]),
            noise[i : i + 1],
            cond[i : i + 1],
            budget[i : i + 1],
            seeds[i : i + 1],
        )
        worst = max(worst, (alone.x0[0] - batch.x0[i]).abs().max().item())
        assert alone.nfe.tolist() == [batch.nfe[i].item()] == [expected_nfe(plans[i])]
        assert alone.schedule(0) == batch.schedule(i)
    print(f"\n[sampler] batch vs alone, max deviation {worst:.2e}")
    assert worst < 1e-5
    # the noise streams matter: other seeds change exactly the samples whose steps inject noise
    other = sample(digits_gmm, PlanPolicy(plans), noise, cond, budget, [s + 1 for s in seeds])
    changed = (other.x0 - batch.x0).flatten(1).abs().amax(1) > 1e-3
    assert changed.tolist() == [True, True, False, True, True]


def test_batch_is_independent_of_order(small_gmm):
    plans = mixed_plans(small_gmm.noise_table)
    seeds = [7, 8, 9, 10, 11]
    noise = initial_noise(seeds, (4,), F64)
    cond = Condition.make([-1, 0, 1, 2, -1], [1, 1, 2.0, 1, 0.0])
    res = sample(small_gmm, PlanPolicy(plans), noise, cond, UNLIMITED, seeds)
    perm = [3, 0, 4, 2, 1]
    shuffled = sample(
        small_gmm,
        PlanPolicy([plans[i] for i in perm]),
        noise[perm],
        cond[torch.tensor(perm)],
        UNLIMITED,
        [seeds[i] for i in perm],
    )
    assert torch.allclose(shuffled.x0, res.x0[perm], rtol=0, atol=1e-12)
    assert shuffled.nfe.tolist() == res.nfe[perm].tolist()


# ------------------------------------------------------------------------------ NFE accounting


@pytest.mark.parametrize("solver", EXPERT_NAMES)
def test_nfe_counts_every_network_evaluation(small_gmm, solver):
    noise = initial_noise(range(3), (4,), F64)
    cond = Condition.make(-1, batch=3)
    for n in (1, 2, 3, 6):
        log = []
        res = sample(
            Counting(small_gmm, log),
            FixedSchedulePolicy(solver, karras(n, small_gmm.noise_table), eta=0.5),
            noise,
            cond,
            UNLIMITED,
        )
        want = 2 * n - 1 if solver == "heun" else n
        assert res.nfe.tolist() == [want] * 3
        assert sum(size for _, size in log) == res.nfe.sum().item()  # nothing evaluated unpaid
        assert len(log) == want  # the whole batch shares each call


def test_budget_is_a_hard_cap(small_gmm):
    """A policy that never steps to 0 is stopped at each sample's own budget."""

    class Creep:
        name = "creep"

        def __init__(self, expert):
            self.expert = expert_index(expert)

        def act(self, obs):
            b = len(obs.index)
            return Decision(torch.full((b,), self.expert), obs.sigma * 0.9, torch.zeros(b))

    budgets = torch.tensor([1, 2, 3, 5, 8, 13])
    b = len(budgets)
    noise = initial_noise(range(b), (4,), F64)
    cond = Condition.make(-1, batch=b)
    for solver in EXPERT_NAMES:
        log = []
        res = sample(Counting(small_gmm, log), Creep(solver), noise, cond, budgets)
        assert torch.isfinite(res.x0).all()
        assert sum(size for _, size in log) == res.nfe.sum().item()
        assert (res.nfe <= budgets).all(), (solver, res.nfe)
        if solver == "heun":  # each step costs 2; the last (forced to 0) costs 1
            assert (res.nfe >= budgets - 1).all()
        else:
            assert res.nfe.tolist() == budgets.tolist()
        for i in range(b):
            steps = res.schedule(i)
            assert steps[-1]["sigma_next"] == 0.0
            assert all(s["sigma_next"] > 0 for s in steps[:-1])
            assert steps[-1]["nfe"] == res.nfe[i]
    # a scalar budget applies to every sample
    res = sample(small_gmm, Creep("euler"), noise, cond, 4)
    assert res.nfe.tolist() == [4] * b


def test_policy_cannot_stall_or_go_back(small_gmm):
    """sigma_next >= sigma is clamped to progress; the loop is bounded even with no budget."""

    class Stall:
        name = "stall"

        def act(self, obs):
            b = len(obs.index)
            return Decision(torch.zeros(b, dtype=torch.long), obs.sigma * 2, torch.zeros(b))

    noise = initial_noise(range(2), (4,), F64)
    res = sample(small_gmm, Stall(), noise, Condition.make(-1, batch=2), UNLIMITED)
    assert res.nfe.tolist() == [MAX_STEPS, MAX_STEPS]
    steps = res.schedule(1)
    assert len(steps) == MAX_STEPS and steps[-1]["sigma_next"] == 0.0
    assert all(s["sigma_next"] < s["sigma"] for s in steps)
    assert torch.isfinite(res.x0).all()


def test_samples_finish_independently(small_gmm):
    lengths = [2, 5, 9]
    plans = [plan(karras(n, small_gmm.noise_table), "dpmpp-2m") for n in lengths]
    noise = initial_noise(range(3), (4,), F64)
    log = []
    res = sample(
        Counting(small_gmm, log), PlanPolicy(plans), noise, Condition.make(-1, batch=3), UNLIMITED
    )
    assert res.nfe.tolist() == lengths
    assert [len(res.schedule(i)) for i in range(3)] == lengths
    sizes = [size for _, size in log]
    assert sizes == [3] * 2 + [2] * 3 + [1] * 4  # finished samples leave the batch
    for i, n in enumerate(lengths):  # each one alone gives the same
        alone = sample(
            small_gmm, PlanPolicy([plans[i]]), noise[i : i + 1], Condition.make(-1), UNLIMITED
        )
        assert torch.allclose(alone.x0[0], res.x0[i], rtol=0, atol=1e-12)
        assert alone.nfe.tolist() == [n]


def test_one_denoiser_call_per_stage(small_gmm):
    """Heun and the one-evaluation solvers mixed in one batch: at most two calls per sampler step
    (the shared evaluation, then one call serving every Heun correction)."""
    noise_map = small_gmm.noise_table
    plans = [
        plan(karras(4, noise_map), "heun"),
        plan(karras(6, noise_map), "euler"),
        plan(karras(3, noise_map), "heun"),
        plan(karras(6, noise_map), ["euler", "heun", "unipc", "heun", "dpmpp-2m", "heun"]),
        plan(karras(5, noise_map), "euler-ancestral", eta=1.0),
    ]
    b = len(plans)
    log = []
    res = sample(
        Counting(small_gmm, log),
        PlanPolicy(plans, log),
        initial_noise(range(b), (4,), F64),
        Condition.make(-1, batch=b),
        UNLIMITED,
    )
    assert res.nfe.tolist() == [expected_nfe(p) for p in plans]
    assert sum(size for kind, size in log if kind == "call") == res.nfe.sum().item()
    # Between two policy calls come this step's Heun corrections (if any) and the next step's
    # shared evaluation: so a step's own corrections are one call, whatever the mix of solvers.
    acts = [k for k, (kind, _) in enumerate(log) if kind == "act"]
    steps = max(len(p) for p in plans)
    assert len(acts) == steps and log[0] == ("call", b) and acts[0] == 1
    between = [
        sum(kind == "call" for kind, _ in log[a + 1 : (acts[j + 1] if j + 1 < steps else None)])
        for j, a in enumerate(acts)
    ]
    heun_steps = {k for p in plans for k, (e, s, _) in enumerate(p) if e == "heun" and s > 0}
    assert between == [(j < steps - 1) + (j in heun_steps) for j in range(steps)]
    assert max(between) <= 2
    assert sum(kind == "call" for kind, _ in log) == steps + len(heun_steps)
    # the correction call serves exactly the Heun samples still above 0
    for j in sorted(heun_steps):
        size = log[acts[j] + 1][1]
        assert size == sum(len(p) > j and p[j][0] == "heun" and p[j][1] > 0 for p in plans)


def test_schedule_reports_the_steps(small_gmm):
    plans = mixed_plans(small_gmm.noise_table)
    seeds = list(range(len(plans)))
    res = sample(
        small_gmm,
        PlanPolicy(plans, confidence=True),
        initial_noise(seeds, (4,), F64),
        Condition.make(-1, batch=len(plans)),
        UNLIMITED,
        seeds,
    )
    for i, p in enumerate(plans):
        steps = res.schedule(i)
        assert len(steps) == len(p)
        sigma = small_gmm.noise_table.sigma_max
        nfe = 0
        for row, (expert, nxt, eta) in zip(steps, p, strict=True):
            nfe += 1 + (EXPERTS[expert_index(expert)].extra_nfe if nxt > 0 else 0)
            assert set(row) == {"sigma", "sigma_next", "expert", "eta", "nfe", "confidence"}
            assert row["sigma"] == pytest.approx(sigma, rel=1e-15)
            assert row["sigma_next"] == pytest.approx(nxt, rel=1e-15)
            assert row["expert"] == expert_index(expert)
            assert row["eta"] == eta
            assert row["nfe"] == nfe
            assert 0.5 <= row["confidence"] <= 0.9
            sigma = row["sigma_next"]
        assert steps[-1]["sigma_next"] == 0.0
        assert steps[-1]["nfe"] == res.nfe[i]
    # without a confidence the key is absent
    fixed = sample(
        small_gmm,
        FixedSchedulePolicy("heun", karras(3, small_gmm.noise_table)),
        initial_noise([0], (4,), F64),
        Condition.make(-1),
        UNLIMITED,
    )
    assert [r["nfe"] for r in fixed.schedule(0)] == [2, 4, 5]
    assert "confidence" not in fixed.schedule(0)[0]
    assert fixed.schedule(5) == []  # no such sample: no steps
