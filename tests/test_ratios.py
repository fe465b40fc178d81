"""``rldiff ratios``: the numbers that judge the router, computed from result rows alone."""

import math

import pytest

from rldiff.evaluation.ratios import POOLED, format_table, ratio_rows


def _row(policy, family, guidance, rmse, budget=5, usage="{}"):
    return {"policy": policy, "family": family, "budget": budget, "guidance": guidance,
            "rmse_mean": rmse, "expert_usage": usage}  # fmt: skip


def test_ratios_capture_and_the_best_global_per_group():
    rows = [
        _row("global:unipc", "global", POOLED, 0.12),
        _row("global:dpmpp-2m", "global", POOLED, 0.11),
        _row("table", "table", POOLED, 0.10),
        _row("oracle", "oracle", POOLED, 0.06),
        _row("moe", "learned", POOLED, 0.08, usage='{"unipc": 0.7, "dpmpp-2m": 0.3}'),
        _row("ppo-single", "learned", POOLED, 0.1),
        _row("table", "table", 7.5, 0.2),
        _row("oracle", "oracle", 7.5, 0.2),  # no gain over the table: capture undefined
        _row("moe", "learned", 7.5, 0.25),
        _row("global:unipc", "global", 7.5, 0.3),
        _row("moe", "learned", POOLED, 0.5, budget=8),  # another budget, filtered out
    ]
    out = ratio_rows(rows, {5})
    moe = next(r for r in out if r["policy"] == "moe" and r["guidance"] == POOLED)
    assert moe["best_global"] == "global:dpmpp-2m"
    assert moe["vs_best_global"] == pytest.approx(0.08 / 0.11)
    assert moe["vs_table"] == pytest.approx(0.8)
    assert moe["capture"] == pytest.approx(0.5)  # (0.10 - 0.08) / (0.10 - 0.06)
    assert moe["vs_ppo_single"] == pytest.approx(0.8)
    assert moe["oracle_vs_table"] == pytest.approx(0.6)
    single = next(r for r in out if r["policy"] == "ppo-single")
    assert math.isnan(single["vs_ppo_single"])
    high = next(r for r in out if r["policy"] == "moe" and r["guidance"] == 7.5)
    assert math.isnan(high["capture"]) and high["vs_table"] == pytest.approx(1.25)
    assert all(r["budget"] == 5 for r in out)
    text = format_table(out)
    assert "| 5 | all | `global:dpmpp-2m` |" in text and "unipc 70%, dpmpp-2m 30%" in text
    assert "50%" in text and "0.80×" in text
