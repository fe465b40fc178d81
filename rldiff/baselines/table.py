"""The conditional table: for each (budget, guidance), one solver on its own optimised schedule.

The strongest non-learned baseline. Every global solver's schedule is optimised per budget on the
training seeds of each guidance scale (``rldiff.baselines.global_schedule``), and the table keeps,
per (budget, guidance), the solver whose optimised schedule had the lowest training RMSE. A sample
whose guidance is not in the table takes the nearest scale's entry; a budget not in it is an error.
Per-sample learning is shown only by beating this table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rldiff.core.policies import Decision, Observation
from rldiff.core.solvers import expert_index


@dataclass(frozen=True)
class TableEntry:
    solver: str
    sigmas: tuple[float, ...]  # decreasing, ending in 0
    train_rmse: float


class TablePolicy:
    """``entries``: (budget, guidance) -> ``TableEntry``."""

    def __init__(self, entries: dict[tuple[int, float], TableEntry], name: str = "table"):
        self.entries = dict(entries)
        self.name = name
        self.experts = sorted({expert_index(e.solver) for e in self.entries.values()})

    def entry(self, budget: int, guidance: float) -> TableEntry:
        scales = [g for b, g in self.entries if b == budget]
        if not scales:
            have = sorted({b for b, _ in self.entries})
            raise KeyError(f"the table has no budget {budget}: it has {have}")
        nearest = min(scales, key=lambda g: abs(g - guidance))
        return self.entries[(budget, nearest)]

    def act(self, obs: Observation) -> Decision:
        b = len(obs.index)
        expert = torch.zeros(b, dtype=torch.long)
        nxt = torch.zeros(b, dtype=torch.float64)
        keys = torch.stack([obs.budget.to(torch.float64), obs.guidance.to(torch.float64)], 1)
        for budget, guidance in keys.unique(dim=0).tolist():
            rows = (keys[:, 0] == budget) & (keys[:, 1] == guidance)
            e = self.entry(int(budget), guidance)
            table = torch.tensor(e.sigmas, dtype=torch.float64)
            step = obs.step[rows] + 1
            inside = step < len(table)
            nxt[rows] = torch.where(inside, table[step.clamp_max(len(table) - 1)], 0.0)
            expert[rows] = expert_index(e.solver)
        return Decision(expert, nxt, torch.zeros(b, dtype=torch.float64))

    def save(self, path) -> None:
        rows = [
            {"budget": b, "guidance": g, "solver": e.solver, "sigmas": list(e.sigmas),
             "train_rmse": e.train_rmse}
            for (b, g), e in sorted(self.entries.items())
        ]  # fmt: skip
        Path(path).write_text(json.dumps(rows, indent=1))

    @classmethod
    def load(cls, path, name: str = "table") -> TablePolicy:
        rows = json.loads(Path(path).read_text())
        entries = {
            (int(r["budget"]), float(r["guidance"])): TableEntry(
                r["solver"], tuple(r["sigmas"]), float(r["train_rmse"])
            )
            for r in rows
        }
        return cls(entries, name)


def table_of_entries(entries: list[dict]) -> TablePolicy:
    """The table of own-schedule entries ``{solver, budget, guidance, sigmas, train_rmse}`` (a
    ``TrainConfig.base_schedules`` list)."""
    found = {(e["solver"], int(e["budget"]), float(e["guidance"])): e for e in entries}
    return best_table(found)


def best_table(schedules: dict[tuple[str, int, float], dict]) -> TablePolicy:
    """From per-guidance optimised schedules ((solver, budget, guidance) -> {"sigmas",
    "train_rmse"}), the table of the lowest training RMSE per (budget, guidance)."""
    best: dict[tuple[int, float], TableEntry] = {}
    for (solver, budget, guidance), found in sorted(schedules.items()):
        entry = TableEntry(solver, tuple(found["sigmas"]), float(found["train_rmse"]))
        key = (budget, guidance)
        if key not in best or entry.train_rmse < best[key].train_rmse:
            best[key] = entry
    return TablePolicy(best)
