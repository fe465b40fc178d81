"""What a trial of the Tune search is: the search spaces, a trial's ``TrainConfig`` from its
parameters, and the metric trials are compared on while they train (ASHA's, ``METRIC``: the
training-seed RMSE over the base schedule's, lower is better; a ``rldiff.rl.loop`` metric).

Shared by the search (``rldiff.search.tune``) and what is done with its trials afterwards
(``rldiff.search.report``).
"""

from __future__ import annotations

import dataclasses

from rldiff.config import TrainConfig
from rldiff.core.routing import experts_in_use

METRIC, MODE = "charts/rmse_vs_base", "min"  # ASHA's metric: training quality vs the base

# Search spaces: parameter -> [kind, arguments]; the kinds are Tune's sampling functions. JSON-able
# (saved in tune.json). "hidden" is "<width>x<width>...", "experts" "all" or comma-separated names.
QUICK_SPACE = {
    "lr": ["loguniform", 1e-4, 1e-3],
    "router_entropy_coeff": ["loguniform", 0.02, 0.5],  # around the default 0.2 (the start)
    "router_entropy_final": ["choice", [0.01, 0.05]],  # where the annealed bonus ends
    "entropy_coeff": ["choice", [0.0, 0.001, 0.01]],
    "clip": ["choice", [0.1, 0.2, 0.3]],
    "hidden": ["choice", ["32x32", "64x64", "128x128"]],
    "cost_per_nfe": ["choice", [0.0, 0.005, 0.02]],
    "step_range": ["uniform", 1.2, 2.0],
    "experts": ["choice", ["all", "unipc,dpmpp-2m,heun", "unipc,dpmpp-2m"]],
    "router_warm_start": ["choice", [0.8, 0.95]],
}
FULL_SPACE = {
    **QUICK_SPACE,
    "hidden": ["choice", ["64x64", "128x128", "256x256", "128x128x128"]],
    "experts": ["choice", ["all", "unipc,dpmpp-2m,heun", "unipc,dpmpp-2m", "unipc"]],
    "num_epochs": ["choice", [2, 4, 8]],
    "lambda_": ["choice", [0.9, 0.95, 1.0]],
}
SAMPLERS = ("choice", "uniform", "loguniform", "randint")


def search_space(space: dict) -> dict:
    """Tune's param space from the JSON description (see ``QUICK_SPACE``)."""
    from ray import tune

    out = {}
    for name, (kind, *args) in space.items():
        if kind not in SAMPLERS:
            raise ValueError(f"search space {name}: unknown kind {kind!r}; use one of {SAMPLERS}")
        out[name] = getattr(tune, kind)(*args)
    return out


def trial_config(base: TrainConfig, params: dict) -> TrainConfig:
    """The ``TrainConfig`` of one trial: ``base`` with the trial's parameters (``hidden`` as
    "64x64", ``experts`` as "all" or comma-separated names, everything else as is)."""
    values = dict(params)
    if "hidden" in values:
        values["hidden"] = tuple(int(h) for h in str(values["hidden"]).split("x"))
    if "experts" in values:
        names = str(values["experts"])
        values["experts"] = None if names == "all" else tuple(names.split(","))
        experts_in_use(values["experts"])  # unknown names fail here, not in a trial
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"search space: {unknown} are not TrainConfig fields")
    return dataclasses.replace(base, **values)
