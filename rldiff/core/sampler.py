"""The one sampler loop, shared by training, evaluation and serving.

Every sample in a batch follows its own schedule and solver: at each step the sampler evaluates the
denoiser once for all unfinished samples, asks the policy for each sample's (expert, sigma_next,
noise amount), then runs each expert on its samples, serving every further evaluation the experts
ask for with one denoiser call per stage. NFE is counted per sample (every network evaluation), a
per-sample budget caps it, and samples finish independently when they reach sigma = 0.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from rldiff.core.denoisers import Condition, Denoiser
from rldiff.core.policies import Decision, Observation, Policy
from rldiff.core.seeds import step_generators
from rldiff.core.solvers import EXPERTS, History

MAX_STEPS = 1000  # a hard bound on the loop, whatever the policy does


@dataclass
class StepRecord:
    """One sampler step for the samples ``rows`` that took it."""

    rows: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    expert: torch.Tensor
    eta: torch.Tensor  # noise amount in [0, 1]
    nfe: torch.Tensor  # cumulative NFE of those samples after the step
    confidence: torch.Tensor | None = None


@dataclass
class SampleResult:
    x0: torch.Tensor
    nfe: torch.Tensor  # [B] network evaluations per sample
    seconds: float
    steps: list[StepRecord] = field(default_factory=list)

    def schedule(self, i: int) -> list[dict]:
        """The steps sample ``i`` took: sigma, sigma_next, expert index, noise amount, NFE so far."""
        out = []
        for r in self.steps:
            hit = (r.rows == i).nonzero()
            if len(hit):
                j = int(hit[0])
                row = {
                    "sigma": float(r.sigma[j]),
                    "sigma_next": float(r.sigma_next[j]),
                    "expert": int(r.expert[j]),
                    "eta": float(r.eta[j]),
                    "nfe": int(r.nfe[j]),
                }
                if r.confidence is not None:
                    row["confidence"] = float(r.confidence[j])
                out.append(row)
        return out


def sample(
    denoiser: Denoiser,
    policy: Policy,
    noise: torch.Tensor,
    cond: Condition,
    budget: int | torch.Tensor,
    seeds=None,
) -> SampleResult:
    """Samples from unit noise ``[B, *shape]`` (scaled to sigma_max here) under ``policy``.

    ``budget`` is a hard per-sample cap on NFE; ``seeds`` seed the noise stochastic steps inject.
    """
    batch = Sampling(denoiser, noise, cond, budget, seeds)
    while not batch.done:
        batch.advance(policy.act(batch.observe()))
    return batch.result()


class Sampling:
    """A batch in flight, advanced one decision at a time: ``observe()`` evaluates the denoiser at
    every unfinished sample's current point and describes it; ``advance(decision)`` takes the step.
    ``sample()`` drives it with a policy; an RL environment drives it with the agents' actions."""

    def __init__(self, denoiser: Denoiser, noise, cond: Condition, budget, seeds=None):
        self.start = time.perf_counter()
        b = len(noise)
        self.denoiser = denoiser
        noise = noise.to(getattr(denoiser, "device", noise.device))  # where the model runs
        self.run = _Run(denoiser, cond, torch.as_tensor(budget).expand(b).clone().long(), seeds, b)
        self.sigma = torch.full((b,), denoiser.noise_table.sigma_max, dtype=torch.float64)
        self.x = noise * denoiser.noise_table.sigma_max
        self.history = History.empty(b, tuple(noise.shape[1:]), noise.dtype, noise.device)
        self.last = _Last(b)
        self.steps: list[StepRecord] = []
        self._pending = None  # (rows, denoised) observed but not yet stepped

    @property
    def done(self) -> bool:
        return not bool((self.sigma > 0).any())

    @property
    def nfe(self) -> torch.Tensor:
        return self.run.nfe

    def observe(self) -> Observation:
        """One network evaluation for every unfinished sample, and what a policy sees of it."""
        if self._pending is None:
            rows = (self.sigma > 0).nonzero().squeeze(1)
            self._pending = rows, self.run.evaluate(rows, self.x[rows], self.sigma[rows])
        rows, denoised = self._pending
        return _observe(
            rows, len(self.steps), self.sigma, denoised, self.run, self.last, self.denoiser
        )

    def advance(self, decision: Decision) -> Decision:
        """Steps the observed samples as decided (clamped to the budget); returns what was applied."""
        if self._pending is None:
            raise RuntimeError("advance() needs an observe() first")
        (rows, denoised), self._pending = self._pending, None
        sigma, run = self.sigma[rows], self.run
        decision = _feasible(decision, sigma, run.nfe[rows], run.budget[rows], len(self.steps))
        x_next, x_start = run.advance(
            rows, self.x[rows], sigma, denoised, self.history[rows], decision
        )
        stochastic = torch.tensor([EXPERTS[e].stochastic for e in decision.expert.tolist()])
        self.history.push(
            rows, self.x[rows], x_start, sigma, denoised, ~(stochastic & (decision.eta > 0))
        )
        self.steps.append(
            StepRecord(
                rows,
                sigma,
                decision.sigma_next,
                decision.expert,
                decision.eta,
                run.nfe[rows].clone(),
                decision.confidence,
            )  # fmt: skip
        )
        self.last.update(rows, denoised, sigma, decision)
        self.x[rows] = x_next
        self.sigma[rows] = decision.sigma_next
        return decision

    def result(self) -> SampleResult:
        return SampleResult(self.x, self.run.nfe, time.perf_counter() - self.start, self.steps)


class _Run:
    """Denoiser calls with NFE accounting, and the per-expert dispatch of one step."""

    def __init__(self, denoiser, cond, budget, seeds, b):
        self.denoiser, self.cond, self.budget = denoiser, cond, budget
        self.nfe = torch.zeros(b, dtype=torch.long)
        self.generators = step_generators(range(b) if seeds is None else seeds)

    def evaluate(self, rows, x, sigma):
        self.nfe[rows] += 1
        return self.denoiser(x, sigma, self.cond[rows])

    def advance(self, rows, x, sigma, denoised, history, decision: Decision):
        x_next, x_start = torch.empty_like(x), torch.empty_like(x)
        pending = []  # (generator, expert rows, request)
        for k in decision.expert.unique().tolist():
            sel = (decision.expert == k).nonzero().squeeze(1)
            eta = decision.eta[sel]
            fresh = self._noise(rows[sel], x[sel], eta) if EXPERTS[k].stochastic else None
            out = EXPERTS[k].step(
                x[sel],
                sigma[sel],
                decision.sigma_next[sel],
                denoised[sel],
                history[sel],
                eta,
                fresh,
            )
            if inspect.isgenerator(out):
                pending.append((out, sel, None))
            else:
                x_next[sel], x_start[sel] = out
        pending = [self._resume(g, sel, None, x_next, x_start) for g, sel, _ in pending]
        pending = [p for p in pending if p is not None]
        while pending:  # one network call per stage, over every expert that asked
            sub = [sel[mask] for _, sel, (mask, _, _) in pending]
            denoised_all = self.evaluate(
                rows[torch.cat(sub)],
                torch.cat([req[1] for _, _, req in pending]),
                torch.cat([req[2] for _, _, req in pending]),
            )
            parts = denoised_all.split([len(s) for s in sub])
            pending = [
                self._resume(g, sel, part, x_next, x_start)
                for (g, sel, _), part in zip(pending, parts, strict=True)
            ]
            pending = [p for p in pending if p is not None]
        return x_next, x_start

    @staticmethod
    def _resume(gen, sel, value, x_next, x_start):
        try:
            request = gen.send(value)
        except StopIteration as done:
            x_next[sel], x_start[sel] = done.value
            return None
        return gen, sel, request

    def _noise(self, rows, x, eta):
        out = torch.zeros_like(x)
        for j, (i, e) in enumerate(zip(rows.tolist(), eta.tolist(), strict=True)):
            if e > 0:
                out[j] = torch.randn(x.shape[1:], generator=self.generators[i], dtype=x.dtype)
        return out


class _Last:
    """What the previous step left behind, for the observation."""

    def __init__(self, b):
        self.denoised = None
        self.h = torch.zeros(b, dtype=torch.float64)
        self.expert = torch.full((b,), -1, dtype=torch.long)

    def update(self, rows, denoised, sigma, decision):
        if self.denoised is None:
            self.denoised = torch.zeros_like(denoised[:1]).expand(len(self.h), *denoised.shape[1:])
            self.denoised = self.denoised.clone()
        self.denoised[rows] = denoised
        nxt = decision.sigma_next
        self.h[rows] = torch.where(
            nxt > 0, (sigma / nxt.clamp_min(1e-300)).log(), torch.zeros_like(nxt)
        )
        self.expert[rows] = decision.expert


def _observe(rows, step, sigma, denoised, run, last, denoiser) -> Observation:
    flat = denoised.flatten(1).to(torch.float64)
    if last.denoised is None:
        change = torch.zeros(len(rows), dtype=torch.float64)
    else:
        change = (flat - last.denoised[rows].flatten(1)).pow(2).mean(1).sqrt().cpu()
    return Observation(
        index=rows,
        step=torch.full((len(rows),), step, dtype=torch.long),
        sigma=sigma[rows],
        nfe=run.nfe[rows],
        budget=run.budget[rows],
        denoised_change=change,
        denoised_rms=flat.pow(2).mean(1).sqrt().cpu(),
        last_h=last.h[rows],
        last_expert=last.expert[rows],
        labels=run.cond.labels[rows],
        guidance=run.cond.guidance[rows],
        sigma_min=denoiser.noise_table.sigma_min,
        sigma_max=denoiser.noise_table.sigma_max,
    )


def _feasible(decision: Decision, sigma, nfe, budget, step) -> Decision:
    """Clamps a decision to what the budget allows: a step that would leave no evaluation for the
    next one jumps to sigma = 0 (a hard cap ends the sample); every step makes progress."""
    nxt = decision.sigma_next.to(torch.float64)
    if not torch.isfinite(nxt).all():
        raise ValueError("policy returned a non-finite sigma_next")
    if ((decision.expert < 0) | (decision.expert >= len(EXPERTS))).any():
        raise ValueError(f"policy returned an expert outside 0..{len(EXPERTS) - 1}")
    nxt = torch.minimum(nxt.clamp_min(0), sigma * (1 - 1e-6))
    extra = torch.tensor([EXPERTS[e].extra_nfe for e in decision.expert.tolist()], dtype=torch.long)
    cost = nfe + extra + 1  # evaluations spent once this step and the next one's first are done
    nxt = torch.where((cost > budget) | (step + 1 >= MAX_STEPS), torch.zeros_like(nxt), nxt)
    noise = decision.eta.to(torch.float64).clamp(0, 1)
    return Decision(decision.expert.long(), nxt, noise, decision.confidence)
