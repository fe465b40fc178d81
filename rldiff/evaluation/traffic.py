"""Policies under logged traffic's condition mix, on held-out seeds: how a fine-tuning run
(``rldiff train --conditions-from DIR --init-policy OLD``) is judged.

``compare_on_traffic`` samples each policy at every (guidance, budget) the traffic asked for, on the
evaluation protocol's held-out seeds (``EVAL_SEED_OFFSET + i``, never trained on) at that guidance,
against their reference banks (class-conditional, and unconditional where the traffic sent label
-1), with the shared sampler and the protocol's RMSE. A held-out sample of class ``c`` in the cell
(g, b) weighs ``w(g, b, c) / n_c`` (``n_c``: held-out samples of that class), so each cell's RMSE
follows the traffic's classes, and the pooled RMSE weighs the cells by their share of the traffic.
``write_traffic_report`` writes ``traffic.json`` and ``traffic.md`` and adds the table to
``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch

from rldiff.baselines.specs import PolicySpec
from rldiff.config import EvaluateConfig
from rldiff.core.denoisers import Condition
from rldiff.core.error import rmse_per_sample
from rldiff.core.sampler import sample
from rldiff.core.seeds import initial_noise
from rldiff.data.reference import seed_bank
from rldiff.data.traffic import unconditional_bank
from rldiff.evaluation.protocol import EVAL_SEED_OFFSET, SeedSet

NEW, OLD, TABLE = "new", "old", "table"  # the fine-tuned policy, its initial policy, the table
SECTION = "## Under the logged traffic's conditions"


def held_out_at(cfg: EvaluateConfig, denoiser, guidance: float, labels: set[int]) -> SeedSet:
    """The held-out seeds at one guidance scale: class-conditional (each seed's class) where
    ``labels`` has a class, unconditional copies where it has -1 (a model without classes: its
    banks are unconditional already)."""
    seeds = list(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + cfg.n_samples))
    steps, banks = cfg.reference_steps, []
    if any(c >= 0 for c in labels) or denoiser.num_classes <= 0:
        banks.append(seed_bank(cfg.cache, denoiser, "eval", seeds, guidance, steps, progress=False))
    if -1 in labels and denoiser.num_classes > 0:
        banks.append(unconditional_bank(cfg.cache, denoiser, "eval", seeds, guidance, steps))
    all_seeds = [s for bank in banks for s in bank.seeds.tolist()]
    cond = Condition.make(
        torch.cat([b.cond.labels for b in banks]), torch.cat([b.cond.guidance for b in banks])
    )
    reference = torch.cat([b.x0 for b in banks]).to(torch.float32)
    return SeedSet(all_seeds, cond, initial_noise(all_seeds, tuple(reference.shape[1:])), reference)


def compare_on_traffic(
    cfg: EvaluateConfig, denoiser, conditions: list[list], policies: dict[str, PolicySpec]
) -> dict:
    """Each policy (name -> its spec at any budget) in every (guidance, budget) cell of
    ``conditions`` (``[[guidance, budget, label, weight], ...]``): the cell's traffic share, mean
    RMSE and NFE per policy, then the pooled RMSE per policy and the ratios new / old and
    new / table where those policies are given."""
    cells: dict[tuple[float, int], dict[int, float]] = defaultdict(dict)
    for g, b, label, w in conditions:
        cells[(float(g), int(b))][int(label)] = float(w)
    total = sum(sum(ws.values()) for ws in cells.values())
    rows = []
    for g in sorted({g for g, _ in cells}):
        labels = {c for (gg, _), ws in cells.items() if gg == g for c in ws}
        ev = held_out_at(cfg, denoiser, g, labels)
        for b in sorted(bb for gg, bb in cells if gg == g):
            weights = _sample_weights(ev.cond.labels, cells[(g, b)])
            row = {"guidance": g, "budget": b, "share": sum(cells[(g, b)].values()) / total}
            row["rmse"], row["nfe"] = {}, {}
            for name, spec in policies.items():
                policy = dataclasses.replace(spec, budget=b).build(denoiser.noise_table)
                run = sample(denoiser, policy, ev.noise, ev.cond, b, seeds=ev.seeds)
                rmse = rmse_per_sample(run.x0, ev.reference).double()
                row["rmse"][name] = float((weights * rmse).sum())
                row["nfe"][name] = float((weights * run.nfe.double().cpu()).sum())
            rows.append(_with_ratios(row))
    pooled = {name: sum(r["share"] * r["rmse"][name] for r in rows) for name in policies}
    return {
        "conditions": conditions,
        "n_held_out": cfg.n_samples,
        "policies": {name: spec.path or spec.name for name, spec in policies.items()},
        "cells": rows,
        **_with_ratios({"rmse": pooled}),
    }


def _sample_weights(labels: torch.Tensor, cell: dict[int, float]) -> torch.Tensor:
    """Per held-out sample, its class's traffic weight shared among that class's samples,
    normalised over the cell."""
    labels = labels.cpu()
    weights = torch.zeros(len(labels), dtype=torch.float64)
    for label, w in cell.items():
        rows = labels == label
        if not rows.any():
            raise ValueError(f"no held-out sample of class {label}: use more --eval-samples")
        weights[rows] = w / int(rows.sum())
    return weights / weights.sum()


def _with_ratios(row: dict) -> dict:
    rmse, ratios = row["rmse"], {}
    for a, b in ((NEW, OLD), (NEW, TABLE), (OLD, TABLE)):
        if a in rmse and b in rmse and rmse[b] > 0:
            ratios[f"{a}/{b}"] = rmse[a] / rmse[b]
    return {**row, "ratios": ratios}


def write_traffic_report(out: Path, result: dict) -> str:
    """``traffic.json`` and ``traffic.md`` under ``out``, and the table appended to
    ``out/report.md`` where it exists; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "traffic.json").write_text(json.dumps(result, indent=2))
    names = list(result["policies"])
    ratios = list(result["ratios"])
    head = ["guidance", "budget", "share", *(f"`{n}` RMSE" for n in names), *ratios]
    lines = [
        SECTION,
        "",
        f"Held-out seeds ({result['n_held_out']} per guidance scale), each (guidance, budget) "
        "weighted by its share of the logged samples, each class by the traffic's; "
        + ", ".join(f"`{n}`: {p}" for n, p in result["policies"].items())
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["cells"]:
        values = [f"{r['rmse'][n]:.4f}" for n in names] + [f"{r['ratios'][k]:.3f}" for k in ratios]
        lines.append(
            f"| {r['guidance']:g} | {r['budget']} | {r['share']:.1%} | " + " | ".join(values) + " |"
        )
    pooled = [f"**{result['rmse'][n]:.4f}**" for n in names]
    pooled += [f"**{result['ratios'][k]:.3f}**" for k in ratios]
    lines.append("| pooled | | 100% | " + " | ".join(pooled) + " |")
    text = "\n".join(lines) + "\n"
    (out / "traffic.md").write_text(text)
    report = out / "report.md"
    if report.exists() and SECTION not in report.read_text():
        report.write_text(report.read_text().rstrip("\n") + "\n\n" + text)
    return text
