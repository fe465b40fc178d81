"""``rldiff ratios DIR``: the numbers that say whether the router earns its keep, from an
evaluation's ``results.parquet`` alone.

Per budget and guidance (and pooled: guidance NaN in the file, "all" here), mean reference RMSE of
the best ``global:*`` schedule, the conditional ``table``, the ``oracle`` and each learned policy,
with the ratios policy / best global, policy / table, oracle / table, the capture fraction
``(table - policy) / (table - oracle)`` (the share of the oracle's gain over the table a policy
reaches; negative: worse than the table), where both exist ``moe`` / ``ppo-single``, and each
learned policy's expert usage (share of the steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rldiff.config import TARGET_BUDGETS

POOLED = "all"


def load_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        path = path / "results.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no results.parquet at {path}")
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        g = r.get("guidance")
        r["guidance"] = POOLED if g is None or (isinstance(g, float) and math.isnan(g)) else g
    return rows


def pooled_rows(path: Path) -> list[dict]:
    """The rows over the whole condition mix (one per policy and budget)."""
    return [r for r in load_rows(path) if r["guidance"] == POOLED]


def ratio_rows(rows: list[dict], budgets=None) -> list[dict]:
    """One dict per (budget, guidance, learned policy); a learned-free table gives one row per
    (budget, guidance) with only the baselines."""
    out = []
    keys = sorted({(r["budget"], r["guidance"]) for r in rows}, key=_order)
    for budget, guidance in keys:
        if budgets and budget not in budgets:
            continue
        here = [r for r in rows if r["budget"] == budget and r["guidance"] == guidance]
        rmse = {r["policy"]: r["rmse_mean"] for r in here}
        glob = [r for r in here if r["family"] == "global"]
        best_global = min(glob, key=lambda r: r["rmse_mean"]) if glob else None
        table, oracle = rmse.get("table", math.nan), rmse.get("oracle", math.nan)
        base = {
            "budget": budget,
            "guidance": guidance,
            "best_global": best_global["policy"] if best_global else "",
            "best_global_rmse": best_global["rmse_mean"] if best_global else math.nan,
            "table_rmse": table,
            "oracle_rmse": oracle,
            "oracle_vs_table": oracle / table,
        }
        learned = [r for r in here if r["family"] == "learned"]
        if not learned:
            out.append(base)
        for r in learned:
            value = r["rmse_mean"]
            out.append(
                {
                    **base,
                    "policy": r["policy"],
                    "rmse": value,
                    "vs_best_global": value / base["best_global_rmse"],
                    "vs_table": value / table,
                    "capture": (table - value) / (table - oracle) if table > oracle else math.nan,
                    "vs_ppo_single": value / rmse["ppo-single"]
                    if r["policy"] == "moe" and "ppo-single" in rmse
                    else math.nan,
                    "expert_usage": json.loads(r.get("expert_usage") or "{}"),
                }
            )
    return out


def _order(key):
    budget, guidance = key
    return (budget, -1.0 if guidance == POOLED else float(guidance))


def format_table(rows: list[dict]) -> str:
    """Markdown."""
    head = (
        "| budget | guidance | best global | its RMSE | table | oracle | oracle / table | policy | "
        "RMSE | vs best global | vs table | oracle capture | moe / ppo-single | expert usage |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['guidance']} | `{r['best_global']}` | "
            f"{r['best_global_rmse']:.4f} | {r['table_rmse']:.4f} | {r['oracle_rmse']:.4f} | "
            f"{r['oracle_vs_table']:.2f}× | {_policy(r)} | {_num(r.get('rmse'), '.4f')} | "
            f"{_num(r.get('vs_best_global'), '.2f', '×')} | {_num(r.get('vs_table'), '.2f', '×')} | "
            f"{_num(r.get('capture'), '.0%')} | {_num(r.get('vs_ppo_single'), '.2f', '×')} | "
            f"{_usage(r.get('expert_usage'))} |"
        )
    return "\n".join(lines)


def _usage(usage: dict | None) -> str:
    """The experts' shares of the steps, largest first."""
    if not usage:
        return "—"
    return ", ".join(f"{n} {u:.0%}" for n, u in sorted(usage.items(), key=lambda x: -x[1]))


def _policy(r) -> str:
    return f"`{r['policy']}`" if r.get("policy") else "—"


def _num(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def add_arguments(parser) -> None:
    parser.add_argument("results", type=Path, help="an evaluation directory or its results.parquet")
    parser.add_argument(
        "--budgets",
        default=",".join(map(str, TARGET_BUDGETS)),
        metavar="B,B",
        help="budgets to show (comma-separated; 'all': every budget in the file)",
    )
    parser.add_argument(
        "--pooled", action="store_true", help="only the pooled rows (the whole condition mix)"
    )


def run(args) -> int:
    budgets = None
    if args.budgets != "all":
        try:
            budgets = {int(b) for b in args.budgets.split(",") if b.strip()}
        except ValueError:
            raise ValueError(
                f"--budgets: expected comma-separated integers, got {args.budgets!r}"
            ) from None
    rows = ratio_rows(load_rows(args.results), budgets)
    if args.pooled:
        rows = [r for r in rows if r["guidance"] == POOLED]
    if not rows:
        raise ValueError(f"{args.results}: no rows at budgets {sorted(budgets or [])}")
    print(format_table(rows))
    return 0
