"""Writes the evaluation outputs people read: ``report.md``, ``pareto.png``, sample grids and
``schedules.png``, from what ``rldiff.evaluation.protocol`` computed (nothing here samples or scores).

Where no metric network knows the model's data (``floor`` is None, FD and confidence are NaN), the
report says so and shows "n/a", and the Pareto plot has no FD panel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rldiff.baselines.specs import best_per_budget  # noqa: E402
from rldiff.config import TARGET_BUDGETS  # noqa: E402

FAMILY_ORDER = ("hand-built", "global", "table", "oracle", "adaptive")
LEARNED_FAMILIES = ("learned", "bandit")


def write_report(
    out: Path, rows, grids, floor: dict | None, reference: torch.Tensor, model: dict, table=()
) -> None:
    """``floor``: the metric network's real-data floor, or None where no network knows the data;
    ``rows``: the pooled rows; ``table``: every row of ``results.parquet`` (per guidance too)."""
    families = {f: best_per_budget(rows, f) for f in {r["family"] for r in rows}}
    text = _markdown(rows, families, floor, model)
    by_guidance = [r for r in table if not _pooled(r)]
    if by_guidance:
        text += _mix_section(list(table), floor)
        _usage_panels(by_guidance, out / "usage.png")
    (out / "report.md").write_text(text)
    _pareto(rows, families, floor, out / "pareto.png")
    for budget in sorted({r["budget"] for r in rows}):
        picks = [
            (f"{f}: {families[f][budget]['policy']}", families[f][budget])
            for f in _present(families)
            if budget in families[f]
        ]
        _grid(out / f"grid_nfe{budget}.png", budget, reference, picks, grids)


def _present(families):
    return [f for f in FAMILY_ORDER if f in families] + sorted(set(families) - set(FAMILY_ORDER))


def _num(value, spec: str) -> str:
    """``value`` formatted, or "n/a" where it is absent (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _markdown(rows, families, floor, model) -> str:
    n = rows[0]["n_samples"] if rows else 0
    hand, glob = families.get("hand-built", {}), families.get("global", {})
    lines = [
        "# Evaluation report",
        "",
        f"{n} held-out samples per policy. Reference: high-accuracy ODE solution from the same "
        "noise. RMSE on the [-1, 1] pixel scale.",
        "",
    ]
    if floor is None:
        lines += [
            "**Distribution metrics are absent for this model**: FD and confidence need a metric "
            "network that knows the model's data, and the shipped digit classifier knows only the "
            "1×16×16 digits (the embedded and gmm models). Name one with `--metric-network PATH`. "
            "Quality here is the RMSE to the reference; FD and confidence read n/a.",
            "",
            f"**The model** sampled accurately (`{model['policy']}`, {model['mean_nfe']:.0f} "
            f"NFE): RMSE to the reference {model['rmse_mean']:.4f}.",
        ]
        fd_header = "FD"
    else:
        network = floor.get("network", "the shipped digit classifier")
        ratio = model["fd_at_floor_n"] / floor["fd"]
        lines += [
            f"FD: Fréchet distance on the features of {network}.",
            "",
            f"**Floors** (the {floor['count']} real held-out digits vs the training statistics): "
            f"FD {floor['fd']:.2f}, confidence {floor['confidence']:.3f}. FD falls as the sample "
            "count grows, so compare FDs at equal counts.",
            "",
            f"**The model** sampled accurately (`{model['policy']}`, {model['mean_nfe']:.0f} "
            f"NFE): FD {model['fd']:.2f} on {model['n_samples']} samples, "
            f"{model['fd_at_floor_n']:.2f} on {floor['count']} like the floor ({ratio:.2f}× the "
            f"floor); confidence {model['confidence']:.3f}; RMSE to the reference "
            f"{model['rmse_mean']:.4f}.",
        ]
        fd_header = f"FD (floor {floor['fd']:.1f})"
    lines += [
        "",
        "## Best policy of each family per budget",
        "",
        "| budget | family | policy | mean NFE | max NFE | RMSE mean | RMSE p90 | "
        f"{fd_header} | confidence | vs best hand-built |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for budget in sorted({r["budget"] for r in rows}):
        for f in _present(families):
            r = families[f].get(budget)
            if r is None:
                continue
            ratio = r["rmse_mean"] / hand[budget]["rmse_mean"] if budget in hand else float("nan")
            lines.append(
                f"| {budget} | {f} | `{r['policy']}` | {r['mean_nfe']:.2f} | {r['max_nfe']} | "
                f"{r['rmse_mean']:.4f} | {r['rmse_p90']:.4f} | {_num(r['fd'], '.2f')} | "
                f"{_num(r['confidence'], '.3f')} | {ratio:.2f}× |"
            )
    if hand and glob:
        lines += ["", "## Global schedule vs best hand-built", ""]
        for budget in sorted(set(hand) & set(glob)):
            gain = 1 - glob[budget]["rmse_mean"] / hand[budget]["rmse_mean"]
            lines.append(
                f"- {budget} NFE: `{glob[budget]['policy']}` RMSE {glob[budget]['rmse_mean']:.4f}"
                f" vs `{hand[budget]['policy']}` {hand[budget]['rmse_mean']:.4f}: "
                f"{100 * gain:.0f} % lower error"
            )
    lines += _learned_section(rows, hand, glob)
    lines += [
        "",
        "![quality vs NFE](pareto.png)",
        "",
        "## Every policy",
        "",
        "| budget | policy | mean NFE | max NFE | RMSE mean | RMSE p90 | FD | confidence | s/sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["budget"], r["rmse_mean"])):
        lines.append(
            f"| {r['budget']} | `{r['policy']}` | {r['mean_nfe']:.2f} | {r['max_nfe']} | "
            f"{r['rmse_mean']:.4f} | {r['rmse_p90']:.4f} | {_num(r['fd'], '.2f')} | "
            f"{_num(r['confidence'], '.3f')} | {r['seconds_per_sample'] * 1e3:.2f} ms |"
        )
    return "\n".join(lines) + "\n"


def _pooled(row) -> bool:
    g = row.get("guidance")
    return g is None or (isinstance(g, float) and math.isnan(g))


def _mix_section(table: list[dict], floor) -> str:
    """Per guidance: the ratios that judge the router (``rldiff ratios``), FD beside the model's
    own FD at that guidance, and where the learned policies' experts step (``usage.png``)."""
    from rldiff.evaluation.ratios import POOLED, format_table, ratio_rows

    rows = [{**r, "guidance": POOLED if _pooled(r) else r["guidance"]} for r in table]
    budgets = sorted({r["budget"] for r in rows if r["family"] != "model"})
    target = [b for b in TARGET_BUDGETS if b in budgets] or budgets
    lines = [
        "",
        "## The condition mix: per guidance, table and oracle",
        "",
        "`table`: per (budget, guidance) the solver whose own optimised schedule had the lowest "
        "training RMSE. `oracle`: per held-out sample the best table candidate, then its schedule "
        "optimised against its own reference (a bound, never served). Capture: the share of the "
        "oracle's gain over the table a policy reaches. Pooled (`all`): every guidance weighs "
        f"the same. Budgets {', '.join(map(str, target))} (all of them: `rldiff ratios DIR "
        "--budgets all`).",
        "",
        format_table(ratio_rows(rows, set(target))),
    ]
    model = {r["guidance"]: r for r in rows if r["family"] == "model" and r["guidance"] != POOLED}
    if floor is not None and model:
        mine = [r for r in rows if r["family"] in ("table", "oracle", "learned")]
        names = sorted({r["policy"] for r in mine}, key=lambda p: (p not in ("table", "oracle"), p))
        lines += [
            "",
            "FD per guidance beside its floor: the model itself sampled accurately at that "
            f"guidance, on the same samples (budget {target[len(target) // 2]}).",
            "",
            "| guidance | samples | model FD (floor) | "
            + " | ".join(f"`{n}`" for n in names)
            + " |",
            "|---|---|---|" + "---|" * len(names),
        ]
        b = target[len(target) // 2]
        for g, m in sorted(model.items()):
            at = {r["policy"]: r for r in mine if r["budget"] == b and r["guidance"] == g}
            cells = [_num(at[n]["fd"], ".2f") if n in at else "n/a" for n in names]
            lines.append(
                f"| {g:g} | {m['n_samples']} | {_num(m['fd'], '.2f')} | " + " | ".join(cells) + " |"
            )
    if any(r["family"] == "learned" for r in rows):
        lines += ["", "![expert usage by step and guidance](usage.png)"]
    return "\n".join(lines) + "\n"


def _usage_panels(rows: list[dict], path: Path) -> None:
    """Expert usage by step, one panel per guidance, for each learned policy at the middle target
    budget (stacked shares of the samples that took that step)."""
    from rldiff.core.solvers import EXPERT_NAMES

    learned = sorted({r["policy"] for r in rows if r["family"] == "learned"})
    if not learned:
        return
    budgets = sorted({r["budget"] for r in rows})
    target = [b for b in TARGET_BUDGETS if b in budgets] or budgets
    budget = target[len(target) // 2]
    scales = sorted({r["guidance"] for r in rows})
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        len(learned), len(scales), figsize=(3 * len(scales), 2.6 * len(learned)), squeeze=False
    )
    for i, policy in enumerate(learned):
        for j, g in enumerate(scales):
            ax = axes[i, j]
            row = next(
                (
                    r
                    for r in rows
                    if (r["policy"], r["budget"], r["guidance"]) == (policy, budget, g)
                ),
                None,
            )
            steps = json.loads(row["usage_by_step"]) if row else []
            bottom = [0.0] * len(steps)
            for k, name in enumerate(EXPERT_NAMES):
                share = [s.get(name, 0.0) for s in steps]
                if any(share):
                    ax.bar(range(len(steps)), share, bottom=bottom, color=colours(k), label=name)
                    bottom = [a + b for a, b in zip(bottom, share, strict=True)]
            ax.set_title(f"{policy}, guidance {g:g}, {budget} NFE", fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylim(0, 1)
        axes[i, 0].set_ylabel("share of samples")
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Which expert steps, by step and guidance", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _learned_section(rows, hand: dict, glob: dict) -> list[str]:
    """Each learned policy and the bandit against the targets: RMSE ratio to the best hand-built
    and the best global schedule at the same budget, NFE and per-expert usage."""
    mine = [r for r in rows if r["family"] in LEARNED_FAMILIES]
    if not mine:
        return []
    lines = [
        "",
        "## Learned policies and the bandit against the baselines",
        "",
        "Ratios of mean reference RMSE at the same budget (below 1: better than the baseline).",
        "",
        "| budget | policy | mean NFE | max NFE | RMSE mean | vs best hand-built | vs best global "
        "| FD | expert usage (share of steps) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(mine, key=lambda r: (r["budget"], r["policy"])):
        b = r["budget"]
        h = r["rmse_mean"] / hand[b]["rmse_mean"] if b in hand else float("nan")
        g = r["rmse_mean"] / glob[b]["rmse_mean"] if b in glob else float("nan")
        usage = json.loads(r.get("expert_usage") or "{}")
        shares = ", ".join(f"{n} {u:.2f}" for n, u in sorted(usage.items(), key=lambda x: -x[1]))
        lines.append(
            f"| {b} | `{r['policy']}` | {r['mean_nfe']:.2f} | {r['max_nfe']} | "
            f"{r['rmse_mean']:.4f} | {h:.2f}× | {g:.2f}× | {_num(r['fd'], '.2f')} | {shares} |"
        )
    return lines


def _pareto(rows, families, floor, path: Path) -> None:
    """Quality vs NFE: RMSE, and FD beside it when there is a distribution metric (``floor``)."""
    panels = 1 if floor is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax_rmse = axes[0, 0]
    ax_fd = axes[0, 1] if floor is not None else None
    hand_rows = [r for r in rows if r["family"] == "hand-built"]
    keys = ((ax_rmse, "rmse_mean"),) if floor is None else ((ax_rmse, "rmse_mean"), (ax_fd, "fd"))
    for ax, key in keys:
        ax.scatter(
            [r["mean_nfe"] for r in hand_rows],
            [r[key] for r in hand_rows],
            s=8,
            color="0.75",
            label="every hand-built solver × schedule",
        )
        for f in _present(families):
            pts = list(families[f].values())
            label = "best hand-built" if f == "hand-built" else f"best {f}"
            ax.plot([r["mean_nfe"] for r in pts], [r[key] for r in pts], "o-", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("mean NFE")
        ax.grid(alpha=0.3, which="both")
    ax_rmse.set_ylabel("mean RMSE to the reference")
    ax_rmse.legend(fontsize=8)
    if ax_fd is not None:
        ax_fd.axhline(floor["fd"], color="k", ls="--", lw=1, label="real-data floor")
        ax_fd.set_ylabel("Fréchet distance (classifier features)")
        ax_fd.legend(fontsize=8)
    fig.suptitle("Quality vs network evaluations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(path: Path, budget: int, reference, picks, grids) -> None:
    rows = [("reference (ODE, many steps)", reference)] + [
        (title, grids[r["policy"] + f"@{budget}"]) for title, r in picks
    ]
    cols = len(reference)
    fig, axes = plt.subplots(len(rows), 1, figsize=(cols * 0.45, len(rows) * 0.75))
    for ax, (title, images) in zip(axes, rows, strict=True):
        strip = torch.cat(list(images[:, 0].clamp(-1, 1)), dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(f"{budget} NFE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(chosen, path: Path) -> None:
    """Sigma per step (log axis) of each sample of ``chosen`` (``rldiff.evaluation.protocol.ChosenSchedules``)
    per budget, points coloured by expert."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from rldiff.core.solvers import EXPERT_NAMES

    budgets = list(chosen.steps)
    n, colours = len(chosen.steps[budgets[0]]), plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        1, len(budgets), figsize=(3 * len(budgets), 3.4), sharey=True, squeeze=False
    )
    for ax, budget in zip(axes[0], budgets, strict=True):
        for steps in chosen.steps[budget]:
            sigma = [s for s, _ in steps]  # the final jump to sigma = 0 is off the log axis
            ax.plot(range(len(sigma)), sigma, color="0.8", lw=0.6, zorder=1)
            ax.scatter(range(len(sigma)), sigma, s=12, c=[colours(k) for _, k in steps], zorder=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_title(f"{budget} NFE (mean {chosen.mean_nfe[budget]:.2f})", fontsize=9)
    axes[0, 0].set_ylabel("sigma at the step's start")
    handles = [
        Line2D([], [], marker="o", ls="", color=colours(k), label=EXPERT_NAMES[k])
        for k in chosen.experts
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"Schedules chosen by `{chosen.policy}` on {n} held-out samples", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
