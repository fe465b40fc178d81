"""The traffic log's layout (one Parquet row per served request) and its reading side.

The service writes it (``rldiff.serving.traffic_log``) and training reads it back
(``rldiff train --conditions-from DIR``), so the columns are defined once, here.
``traffic_conditions`` turns a log into the condition distribution training draws from: one
entry per (guidance, budget, label) with the number of served samples that asked for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

FILE_GLOB = "traffic-*.parquet"  # the log's files; files being written start with a dot
TRAFFIC_SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("ms", tz="UTC")),  # when the response was sent
        ("route", pa.string()),  # /v1/generate or /v1/generate/batch
        ("requested_policy", pa.string()),  # what the client asked for ('learned', a baseline)
        ("policy", pa.string()),  # what ran
        ("model", pa.string()),
        ("guidance", pa.float64()),
        ("budget", pa.int32()),
        ("seeds", pa.list_(pa.int64())),  # one per sample
        ("labels", pa.list_(pa.int32())),  # one per sample; -1: unconditional
        ("nfe", pa.list_(pa.int32())),  # network evaluations each sample used
        (
            "sigmas",
            pa.list_(pa.list_(pa.float64())),
        ),  # per sample: each step's sigma, then the last
        ("experts", pa.list_(pa.list_(pa.string()))),  # per sample: each step's expert
        ("latency_ms", pa.float64()),  # in the service, receipt to response
    ]
)


def unconditional_bank(cache, denoiser, name: str, seeds: list[int], guidance: float, steps: int):
    """The cached reference bank of ``seeds`` sampled unconditionally (label -1, as a request
    without labels is served) at ``guidance``: ``seed_bank``'s naming with ``-uncond`` added, so
    it never collides with the class-conditional bank of the same seeds."""
    from rldiff.core.denoisers import UNCONDITIONAL, Condition
    from rldiff.data.reference import bank_path, load_or_build

    cond = Condition.make([UNCONDITIONAL] * len(seeds), float(guidance))
    path = bank_path(cache, denoiser, f"{name}-uncond", len(seeds), float(guidance), steps)
    return load_or_build(path, denoiser, seeds, cond, steps=steps, progress=False)


def traffic_files(directory: str | Path) -> list[Path]:
    """The log's complete files under ``directory`` (subfolders too), oldest first: names start
    with the UTC time they were written; files being written (hidden, ``.tmp``) are left out."""
    found = (p for p in Path(directory).rglob("*.parquet") if not p.name.startswith("."))
    return sorted(found, key=lambda p: (p.name, str(p)))


def read_traffic(directory: str | Path) -> pa.Table:
    """Every row of the traffic log files under ``directory``, oldest file first; a file that is
    not a traffic log raises ``ValueError`` naming it."""
    import pyarrow.parquet as pq

    tables = []
    for f in traffic_files(directory):
        try:
            tables.append(pq.read_table(f, schema=TRAFFIC_SCHEMA))
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{f} is not a traffic log file: {err}") from err
    return pa.concat_tables(tables) if tables else TRAFFIC_SCHEMA.empty_table()


@dataclass(frozen=True)
class TrafficConditions:
    """The conditions of logged traffic: ``counts`` (guidance, budget, label) -> served samples
    (label -1: unconditional), from ``requests`` logged requests of ``model``."""

    model: str
    counts: dict[tuple[float, int, int], int]
    requests: int

    @property
    def samples(self) -> int:
        return sum(self.counts.values())

    def entries(self) -> list[list]:
        """``[[guidance, budget, label, weight], ...]`` (weights sum to 1), sorted: JSON-able, the
        form ``TrainConfig.conditions`` and the env take."""
        total = self.samples
        return [[g, b, c, n / total] for (g, b, c), n in sorted(self.counts.items())]

    def by_guidance_budget(self) -> dict[tuple[float, int], float]:
        """(guidance, budget) -> its share of the served samples."""
        out: Counter = Counter()
        for (g, b, _), n in self.counts.items():
            out[(g, b)] += n / self.samples
        return dict(sorted(out.items()))

    def describe(self) -> str:
        """One line: samples, requests and the largest (guidance, budget) shares."""
        shares = sorted(self.by_guidance_budget().items(), key=lambda kv: -kv[1])
        top = ", ".join(f"g{g:g}@{b} {p:.0%}" for (g, b), p in shares[:4])
        more = f" (+{len(shares) - 4} more)" if len(shares) > 4 else ""
        return f"{self.samples} samples in {self.requests} requests of {self.model}: {top}{more}"


def traffic_conditions(
    directory: str | Path,
    model: str,
    budgets=None,
    guidance_range: tuple[float, float] | None = None,
    num_classes: int | None = None,
) -> TrafficConditions:
    """The condition distribution of the traffic logged under ``directory`` for ``model``.

    Raises ``FileNotFoundError`` (no directory, no log file) or ``ValueError`` (no rows, rows of
    another model, a budget not in ``budgets``, a guidance scale outside ``guidance_range``, a
    label not a class of the model (``num_classes``; 0: unconditional only)), each naming what
    it found."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"traffic log {directory} does not exist")
    if not traffic_files(directory):
        raise FileNotFoundError(f"traffic log {directory} holds no *.parquet file")
    table = read_traffic(directory)
    if table.num_rows == 0:
        raise ValueError(f"traffic log {directory} holds no request")
    rows = table.select(["model", "guidance", "budget", "labels"]).to_pylist()
    others = Counter(r["model"] for r in rows if r["model"] != model)
    if others:
        found = ", ".join(f"{m} ({n})" for m, n in others.most_common())
        raise ValueError(
            f"traffic log {directory} has requests of another model than {model}: {found}"
        )
    counts: Counter = Counter()
    for r in rows:
        for label in r["labels"] or []:
            counts[(float(r["guidance"]), int(r["budget"]), int(label))] += 1
    if not counts:
        raise ValueError(f"traffic log {directory} holds no sample")
    _check_supported(directory, counts, budgets, guidance_range, num_classes)
    return TrafficConditions(model, dict(counts), table.num_rows)


def _check_supported(directory, counts, budgets, guidance_range, num_classes) -> None:
    problems = []
    seen_budgets = sorted({b for _, b, _ in counts})
    if budgets is not None and (bad := [b for b in seen_budgets if b not in set(budgets)]):
        problems.append(f"budgets {bad} (training supports {sorted(budgets)})")
    if guidance_range is not None:
        low, high = guidance_range
        if bad := sorted({g for g, _, _ in counts if not low <= g <= high}):
            problems.append(f"guidance {bad} (training supports {low:g}..{high:g})")
    top = None if num_classes is None else max(num_classes, 0)
    if top is not None and (bad := sorted({c for _, _, c in counts if not -1 <= c < top})):
        problems.append(f"labels {bad} (the model has {num_classes} classes; -1: none)")
    if problems:
        raise ValueError(f"traffic log {directory} asks for {'; '.join(problems)}")
