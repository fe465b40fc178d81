"""What the service can serve: the model, the learned policy (hot-swappable), and the baselines.

Policies are built exactly as the evaluation builds them (``rldiff.baselines.specs.PolicySpec``), so a
name served at a budget is the policy that was measured under that name. Learned policies load only
from directories inside the configured root (no path traversal); their evaluation (``results.parquet``
of the training run, beside the policy) gives the best hand-built schedule per budget, served when
no learned policy could be loaded (``degraded``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from rldiff.baselines.specs import PolicySpec
from rldiff.baselines.table import table_of_entries
from rldiff.config import EvaluateConfig
from rldiff.core.schedules import SCHEDULES
from rldiff.core.solvers import EXPERT_NAMES

LEARNED = "learned"
ADAPTIVE = "adaptive:dpmpp-2m"
TABLE = "table"  # the conditional table of a learned policy's experts' own schedules
HAND_BUILT = tuple(f"fixed:{s}/{k}" for s in EXPERT_NAMES for k in SCHEDULES)


def default_hand_built(budget: int) -> str:
    """The best hand-built schedule measured on the embedded model over the guidance mix (README,
    ``make demo``), used when no evaluation of the served model is at hand."""
    if budget <= 3:
        return "fixed:ipndm/time-uniform"
    return "fixed:dpmpp-2m/time-uniform" if budget <= 8 else "fixed:unipc/logsnr-uniform"


@dataclass
class Learned:
    """A loaded learned policy and what was measured about it."""

    policy: object  # rldiff.baselines.learned.LearnedPolicy
    directory: str  # relative to the policy root
    spec: dict  # policy.json
    evaluation: dict[int, dict]  # budget -> figures of the training run's evaluation
    loaded_at: float

    @property
    def budgets(self) -> list[int] | None:
        """Budgets it serves: those with a base schedule (None: any budget)."""
        schedules = self.spec["base_schedule"]["schedules"]
        if isinstance(schedules, list):  # own schedules: {solver, budget, guidance, ...} entries
            return sorted({int(e["budget"]) for e in schedules})
        return None if schedules is None else sorted(int(b) for b in schedules)


class Catalog:
    """The served model and policies. ``swap`` replaces the learned policy atomically."""

    def __init__(self, model: str, denoiser, root, evaluation: str | None = None):
        from rldiff.core.fingerprint import model_fingerprint

        self.model, self.denoiser = model, denoiser
        self.root = Path(root).resolve()
        self.fingerprint = model_fingerprint(denoiser)
        self.num_classes = model_classes(denoiser)
        self.learned: Learned | None = None
        self.last_swap: dict | None = None
        self.fallback = _evaluation(Path(evaluation), model) if evaluation else {}
        self.adaptive_tol = EvaluateConfig().adaptive_tol
        self._baselines: dict[tuple[str, int], object] = {}

    @property
    def degraded(self) -> bool:
        return self.learned is None

    def swap(self, directory: str | None) -> bool:
        """Loads the learned policy in ``directory`` (inside the root) and swaps it in; on failure
        the policy in service stays and the error is kept in ``last_swap``. Returns success."""
        record = {"requested": directory, "at": time.time()}
        try:
            if not directory:
                raise ValueError("no policy directory configured")
            self.learned = self._load(directory)
            self._baselines = {}  # global:<solver> comes from the policy's base schedule
            self.last_swap = {**record, "ok": True, "error": None}
            return True
        except Exception as err:  # any failure to load leaves the service as it was
            self.last_swap = {**record, "ok": False, "error": f"{type(err).__name__}: {err}"}
            return False

    def _load(self, directory: str) -> Learned:
        from rldiff.baselines.learned import LearnedPolicy

        path = self.inside_root(directory)
        policy = LearnedPolicy.load(path)
        spec = policy.spec
        trained_on = spec.get("model", {}).get("fingerprint")
        if trained_on != self.fingerprint:
            raise ValueError(
                f"policy {directory} was trained on another model ({spec.get('model', {}).get('spec')}, "
                f"fingerprint {str(trained_on)[:12]}) than the one served ({self.model}, "
                f"{self.fingerprint[:12]})"
            )
        evaluation = _evaluation(path.parent / "evaluation", self.model)
        return Learned(policy, str(path.relative_to(self.root)), spec, evaluation, time.time())

    def inside_root(self, directory: str) -> Path:
        """``directory`` (relative to the root, or absolute) resolved; it must lie in the root."""
        path = (self.root / directory).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"policy directory {directory!r} is outside the policy root")
        if not path.is_dir():
            raise FileNotFoundError(f"policy directory {directory!r} does not exist in the root")
        return path

    def names(self) -> list[str]:
        """Every policy name a request may ask for."""
        return [LEARNED, *self._global_names(), ADAPTIVE, *HAND_BUILT]

    def resolve(self, name: str, budget: int) -> tuple[str, tuple, object]:
        """``(served name, batching key, policy)`` for a request; raises ``LookupError`` with a
        message for the client when the name or the budget cannot be served."""
        learned = self.learned
        if name == LEARNED and learned is not None:
            if learned.budgets is not None and budget not in learned.budgets:
                raise LookupError(
                    f"the learned policy serves budgets {learned.budgets}, not {budget}"
                )
            return learned.policy.name, (LEARNED, id(learned)), learned.policy
        if name == LEARNED:  # degraded: the best hand-built schedule for the budget
            name = self.best_hand_built(budget)
        key = (name, budget)
        if key not in self._baselines:
            self._baselines[key] = self._baseline(name, budget)
        return name, key, self._baselines[key]

    def _baseline(self, name: str, budget: int):
        if name == TABLE and TABLE in self._global_names():
            table = table_of_entries(self.learned.spec["base_schedule"]["schedules"])
            table.entry(budget, 1.0)  # LookupError below when the budget is not in it
            return table
        return self._spec(name, budget).build(self.denoiser.noise_table)

    def best_hand_built(self, budget: int) -> str:
        table = self.learned.evaluation if self.learned else self.fallback
        row = table.get(budget, {})
        return row.get("best_hand_built") or default_hand_built(budget)

    def _spec(self, name: str, budget: int) -> PolicySpec:
        if name in HAND_BUILT:
            solver, schedule = name.removeprefix("fixed:").split("/")
            return PolicySpec(name, "hand-built", solver, budget, schedule=schedule)
        if name == ADAPTIVE:
            return PolicySpec(name, "adaptive", "dpmpp-2m", budget, tol=self.adaptive_tol)
        if name in self._global_names():
            schedules = self.learned.spec["base_schedule"]["schedules"]
            if str(budget) not in schedules:
                raise LookupError(f"{name} is known for budgets {sorted(map(int, schedules))}")
            sigmas = tuple(float(s) for s in schedules[str(budget)])
            return PolicySpec(name, "global", name.removeprefix("global:"), budget, sigmas=sigmas)
        raise LookupError(f"unknown policy {name!r}; GET /v1/policy lists the policies served")

    def _global_names(self) -> list[str]:
        """The learned policy's base: the optimised global schedule of its base expert, or the
        conditional table of its experts' own schedules."""
        learned = self.learned
        if learned is None or learned.spec["base_schedule"]["schedules"] is None:
            return []
        if isinstance(learned.spec["base_schedule"]["schedules"], list):
            return [TABLE]  # the experts' own schedules: the conditional table
        return [f"global:{learned.spec['base_expert']}"]

    def info(self) -> dict:
        """What /v1/policy reports."""
        learned = self.learned
        described = None
        if learned is not None:
            training = learned.spec.get("training", {})
            described = {
                "name": learned.policy.name,
                "directory": learned.directory,
                "experts": [e["name"] for e in learned.spec["experts"]],
                "router": learned.spec["router"] is not None,
                "budgets": learned.budgets,
                "base_expert": learned.spec.get("base_expert"),
                "trained_iterations": training.get("iteration"),
                "untrained": bool(training.get("untrained", False)),
                "loaded_at": learned.loaded_at,
            }
        return {
            "model": {
                "spec": self.model,
                "fingerprint": self.fingerprint,
                "classes": self.num_classes,
            },
            "learned": described,
            "degraded": self.degraded,
            "serving": "learned policy" if learned else "best hand-built schedule per budget",
            "evaluation": {
                str(b): row for b, row in (learned.evaluation if learned else self.fallback).items()
            },
            "last_swap": self.last_swap,
            "policies": self.names(),
        }


def model_classes(denoiser) -> int:
    """Class labels the model knows (0..n-1); -1 is always 'no class'."""
    null = getattr(denoiser, "null_class", None)
    if null is not None:
        return int(null)
    means = getattr(denoiser, "means", None)
    return 0 if means is None else int(means.shape[0])


def _evaluation(directory: Path, model: str) -> dict[int, dict]:
    """Per budget, from an evaluation's ``results.parquet`` of the same model: the best hand-built
    schedule, the best global schedule and the learned policy, with their mean reference RMSE and
    NFE (``rldiff.baselines.specs.best_per_budget``). Empty when there is none or it was run on another
    model."""
    import pyarrow.parquet as pq

    from rldiff.baselines.specs import best_per_budget

    results, config = directory / "results.parquet", directory / "config.json"
    if not results.is_file():
        return {}
    if config.is_file() and json.loads(config.read_text()).get("model") != model:
        return {}
    rows = pq.read_table(results).to_pylist()
    rows = [r for r in rows if not _per_guidance(r)]  # the pooled rows: the whole condition mix
    table: dict[int, dict] = {}
    for family, key in (("hand-built", "hand_built"), ("global", "global"), ("learned", "learned")):
        for budget, row in best_per_budget(rows, family).items():
            table.setdefault(int(budget), {}).update(
                {
                    f"best_{key}": row["policy"],
                    f"best_{key}_rmse": float(row["rmse_mean"]),
                    f"best_{key}_mean_nfe": float(row["mean_nfe"]),
                }
            )
    return dict(sorted(table.items()))


def _per_guidance(row: dict) -> bool:
    g = row.get("guidance")
    return g is not None and not (isinstance(g, float) and math.isnan(g))
