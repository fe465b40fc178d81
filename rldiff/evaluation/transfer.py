"""An exported policy scored by the protocol on a model, possibly not the one it was trained on.

``rldiff evaluate --policy DIR --model OTHER`` is a transfer: a policy trained on one model acts on
another. It is only defined where the policy's inputs mean the same thing there, so it is refused
(``ValueError``, one line) where the sample shape differs, where the class count differs (the
observation's class one-hot would name other classes) and where the observation layout or the
policy format is not this code's (``LearnedPolicy.load``). The policy keeps its own base schedules
(optimised on its training model) and is scored at the budgets it has schedules for.
"""

from __future__ import annotations

import json
from pathlib import Path

from rldiff.baselines.learned import LearnedPolicy
from rldiff.baselines.specs import PolicySpec
from rldiff.config import EvaluateConfig
from rldiff.core.fingerprint import model_fingerprint
from rldiff.data.models import load_model

LEARNED = "moe"


def trained_model(spec: dict, directory: Path) -> dict:
    """The policy's record of its training model: spec, fingerprint, sample shape and class
    count (from the model itself when an older export did not record them and it loads here)."""
    entry = dict(spec.get("model") or {})
    if "sample_shape" not in entry or "num_classes" not in entry:
        try:
            denoiser = load_model(entry.get("spec", ""))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"policy {directory} records neither the sample shape nor the classes of its "
                f"model {entry.get('spec')!r}, which does not load here ({err}): re-export it"
            ) from err
        entry["sample_shape"] = list(denoiser.sample_shape)
        entry["num_classes"] = int(denoiser.num_classes)
    return entry


def policy_specs(cfg: EvaluateConfig) -> list[PolicySpec]:
    """``cfg.policy`` as one spec per budget it has schedules for (of ``cfg.budgets``), named
    ``moe`` on its own model and ``moe@<training model>`` on another; ``ValueError`` where it
    cannot act on ``cfg.model`` (see the module docstring)."""
    directory = Path(cfg.policy).resolve()
    LearnedPolicy.load(directory)  # format, observation layout and weights, or a one-line error
    spec = json.loads((directory / "policy.json").read_text())
    trained = trained_model(spec, directory)
    denoiser = load_model(cfg.model)
    shape, classes = list(getattr(denoiser, "sample_shape", ())), int(denoiser.num_classes)
    problems = []
    if list(trained["sample_shape"]) != shape:
        problems.append(f"samples of shape {tuple(trained['sample_shape'])}, not {tuple(shape)}")
    if int(trained["num_classes"]) != classes:
        problems.append(f"{trained['num_classes']} classes, not {classes}")
    if problems:
        raise ValueError(
            f"policy {directory} cannot act on {cfg.model}: it was trained on "
            f"{trained.get('spec')} with {' and '.join(problems)} (its observations would mean "
            "other things)"
        )
    same = trained.get("fingerprint") == model_fingerprint(denoiser)
    name = LEARNED if same else f"{LEARNED}@{Path(str(trained.get('spec'))).name}"
    budgets = [b for b in cfg.budgets if b in set(spec.get("budgets", []))]
    if not budgets:
        raise ValueError(
            f"policy {directory} has base schedules for budgets {spec.get('budgets')}, none of "
            f"--budgets {','.join(map(str, cfg.budgets))}"
        )
    if len(budgets) < len(cfg.budgets):
        print(f"{name}: scored at budgets {budgets} only (its base schedules)")
    if not same:
        print(f"transfer: {name} (trained on {trained.get('spec')}) evaluated on {cfg.model}")
    table = denoiser.noise_table
    here = [float(table.sigma_min), float(table.sigma_max)]
    if trained.get("sigma_range") and [float(s) for s in trained["sigma_range"]] != here:
        print(f"{name}: trained on sigmas {trained['sigma_range']}, this model's are {here}")
    return [PolicySpec(name, "learned", "router", b, path=str(directory)) for b in budgets]
