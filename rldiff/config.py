"""Every setting of every rldiff command, each written once with its help.

A setting is a dataclass field made by ``setting(default, help, ...)``; ``add_flags`` turns the
fields of a settings class into command-line flags (``--field-name``, help text and a parser that
names the flag in its error) and ``from_flags`` reads them back. Other modules import the
defaults from here and never restate them.

Flags keep their old spellings where they had one (``setting(..., flag="--samples")``) and accept
old names as aliases (``aliases=("--samples",)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from rldiff.core.routing import STEP_RANGE
from rldiff.core.schedules import SCHEDULES
from rldiff.core.solvers import EXPERT_NAMES

EMBEDDED = "embedded"  # the shipped digits UNet (rldiff/assets/digits-unet)
EXACT_GMM = "gmm"  # the exact Gaussian mixture fitted to the digits: fast, for tests and CI
MODEL = EMBEDDED  # the default model of every command
MODEL_HELP = "embedded | gmm | a diffusers directory"
CACHE = ".cache/rldiff"  # reference banks, optimised schedules and scores
BUDGETS = (3, 4, 5, 6, 8, 10)  # NFE budgets
TARGET_BUDGETS = (4, 5, 6)  # the budgets the router is judged at (``rldiff ratios``)
N_TRAIN = 128  # training / optimisation seeds 0 .. N_TRAIN - 1 (held-out seeds never overlap)
REFERENCE_STEPS = 200  # steps of a reference solve (checked against twice as many)
GLOBAL_SOLVERS = ("euler", "dpmpp-2m", "unipc", "heun", "ipndm")  # deterministic: RMSE is fair
HELD_OUT = 512  # held-out samples of an evaluation
MINIBATCH_ROWS_PER_SAMPLE = 8  # default SGD minibatch: this many rows per sample of a batch
GUIDANCE_MIX = (1.0, 2.0, 4.0, 7.5)  # the condition mix (equal weight): the best solver changes
LOOPBACK = "127.0.0.1"  # every server listens here unless told otherwise


# --- parsers: each raises ArgumentTypeError with what it expected ------------------------------


def _error(expected: str, text) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def integer_at_least(minimum: int):
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _error(f"an integer >= {minimum}", text) from None
        if value < minimum:
            raise _error(f"an integer >= {minimum}", text)
        return value

    return parse


positive = integer_at_least(1)
non_negative = integer_at_least(0)


def number_above(low: float):
    """A finite number above ``low``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _error("a number", text) from None
        if not (math.isfinite(value) and value > low):
            raise _error(f"a number above {low:g}", text)
        return value

    return parse


def probability_below_one(text: str) -> float:
    """A probability in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise _error("a number", text) from None
    if not 0 <= value < 1:
        raise _error("a probability in [0, 1)", text)
    return value


def non_negative_numbers(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers >= 0."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise _error("comma-separated numbers", text) from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise _error("non-negative numbers", text)
    return values


def non_negative_number(text: str) -> float:
    values = non_negative_numbers(text)
    if len(values) != 1:
        raise _error("one non-negative number", text)
    return values[0]


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, in the given order."""
    values = tuple(positive(t) for t in text.split(",") if t.strip())
    if not values:
        raise _error("comma-separated positive integers", text)
    return values


def budgets(text: str) -> tuple[int, ...]:
    """Comma-separated NFE budgets, sorted, without repeats."""
    return tuple(sorted(set(positive_ints(text))))


def names(allowed: tuple[str, ...]):
    """Comma-separated names from ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(t.strip() for t in text.split(",") if t.strip())
        unknown = [n for n in chosen if n not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(allowed)}")
        return chosen

    return parse


def port(text: str) -> int:
    value = positive(text)
    if value > 65535:
        raise _error("a port 1..65535", text)
    return value


# --- settings and flags ---------------------------------------------------------------------


def setting(
    default=MISSING,
    help: str = "",
    *,
    parse=None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices=None,
    factory=None,
    cli: bool = True,
    prefix: str = "",
):
    """A settings field: its default and help, written once. ``parse``: the flag's parser (default:
    the default's type); ``flag``: the flag's name (default ``--field-name``); ``cli=False``: no
    flag; ``prefix``: a nested settings class whose fields become ``--prefix-field`` flags."""
    metadata = dict(
        help=help, parse=parse, flag=flag, aliases=aliases, choices=choices, cli=cli, prefix=prefix
    )
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Flag:
    name: str  # the attribute the value lands in: field names joined by "."
    default: object
    help: str
    meta: dict


def flags_of(cls, prefix: str = "", path: str = "") -> list[Flag]:
    """The flags of a settings dataclass (nested ones with a ``prefix`` included), or of a pydantic
    model (help from each field's description)."""
    if hasattr(cls, "model_fields"):
        return [
            Flag(name, f.default, f.description or "", {"flag": _flag(name, f.default)})
            for name, f in cls.model_fields.items()
        ]
    out = []
    for f in fields(cls):
        meta = {"help": "", "cli": True, **f.metadata}
        if not meta["cli"]:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if meta.get("prefix"):
            out += flags_of(type(default), prefix + meta["prefix"], path + f.name + ".")
            continue
        flag = meta.get("flag") or _flag(prefix + f.name, default)
        out.append(Flag(path + f.name, default, meta["help"], {**meta, "flag": flag}))
    return out


def _flag(name: str, default) -> str:
    """``--field-name``; ``--no-field-name`` for a setting that is on by default."""
    return "--" + ("no-" if default is True else "") + name.strip("_").replace("_", "-")


def add_flags(parser, cls, *, title: str | None = None, only=None, overrides: bool = False):
    """One flag per setting of ``cls`` (``only``: these field names). ``overrides``: every flag
    defaults to None (unset), for settings that override a preset."""
    group = parser.add_argument_group(title) if title else parser
    for spec in flags_of(cls):
        if only is not None and spec.name not in only:
            continue
        m, dest = spec.meta, f"{cls.__name__}.{spec.name}"
        if isinstance(spec.default, bool):
            action = "store_false" if spec.default else "store_true"
            group.add_argument(m["flag"], dest=dest, action=action, default=None, help=spec.help)
            continue
        metavar = m["flag"].lstrip("-").replace("-", "_").upper()
        kwargs = dict(dest=dest, metavar=metavar, type=m.get("parse") or _parser_for(spec.default))
        if spec.default is MISSING:
            kwargs.update(required=True, help=spec.help)
        elif overrides:
            kwargs.update(default=None, help=spec.help)
        else:
            kwargs.update(default=spec.default, help=spec.help + " (default: %(default)s)")
        if m.get("choices"):
            kwargs.update(
                choices=m["choices"], metavar="{" + ",".join(map(str, m["choices"])) + "}"
            )
        group.add_argument(m["flag"], *m.get("aliases", ()), **kwargs)
    return parser


def _parser_for(default):
    if isinstance(default, Path):
        return Path
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def from_flags(cls, args: argparse.Namespace, base=None):
    """``base`` (default: ``cls``'s defaults) with the values of the flags that were given."""
    given: dict[str, dict] = {}
    for key, value in vars(args).items():
        if key.startswith(cls.__name__ + ".") and value is not None:
            head, _, rest = key.removeprefix(cls.__name__ + ".").partition(".")
            given.setdefault(head, {})[rest] = value
    top = {k: v[""] for k, v in given.items() if "" in v}
    if hasattr(cls, "model_validate"):  # a pydantic model: validated as it is built
        return cls.model_validate({**(base.model_dump() if base is not None else {}), **top})
    obj = cls(**top) if base is None else dataclasses.replace(base, **top)
    nested = {k: dataclasses.replace(getattr(obj, k), **v) for k, v in given.items() if "" not in v}
    return dataclasses.replace(obj, **nested)


@dataclass
class ServeRun:
    """``rldiff serve``: where it listens and for how long (the app's settings are
    ``rldiff.serving.app.AppArgs``)."""

    host: str = setting(LOOPBACK, "HTTP address (default: loopback only)")
    port: int = setting(8000, "HTTP port", parse=port)
    for_seconds: float | None = setting(
        None, "stop after this long (default: until Ctrl-C)", parse=number_above(0.0)
    )


# --- the settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig:
    """The coordinate search that optimises one global schedule per (solver, budget)."""

    rounds: int = setting(
        4, "passes over the coordinates; the step halves after each", parse=positive
    )
    initial_step: float = setting(0.4, "first move, in log sigma", parse=number_above(0.0))
    min_gap: float = setting(
        0.02, "smallest log-sigma gap between neighbouring levels", parse=number_above(0.0)
    )


@dataclass
class EvaluateConfig:
    """``rldiff evaluate``: every baseline at every budget on fixed held-out seeds."""

    out: Path = setting(
        Path("runs/evaluate"), "output directory (results.parquet, report.md, plots)"
    )
    model: str = setting(MODEL, MODEL_HELP)
    n_samples: int = setting(HELD_OUT, "held-out samples", parse=positive, flag="--samples")
    n_train: int = setting(
        N_TRAIN,
        "samples (disjoint seeds) the global schedules and the bandit are optimised on",
        parse=positive,
        flag="--train-samples",
    )
    budgets: tuple[int, ...] = setting(BUDGETS, "comma-separated NFE budgets", parse=budgets)
    solvers: tuple[str, ...] = setting(
        EXPERT_NAMES, "hand-built solvers (comma-separated)", parse=names(EXPERT_NAMES)
    )
    schedules: tuple[str, ...] = setting(
        tuple(SCHEDULES), "hand-built schedules (comma-separated)", parse=names(tuple(SCHEDULES))
    )
    global_solvers: tuple[str, ...] = setting(
        GLOBAL_SOLVERS,
        "solvers whose schedule is optimised per budget",
        parse=names(GLOBAL_SOLVERS),
    )
    guidance: tuple[float, ...] = setting(
        GUIDANCE_MIX,
        "guidance scales of the condition mix, equal weight (comma-separated; one: a single "
        "condition)",
        parse=non_negative_numbers,
    )
    reference_steps: int = setting(REFERENCE_STEPS, "steps of the reference solve", parse=positive)
    search: SearchConfig = setting(factory=SearchConfig, prefix="search-")
    oracle_rounds: int = setting(
        2,
        "coordinate-search passes of the oracle's per-sample schedules (0: the best table "
        "candidate per sample only)",
        parse=non_negative,
    )
    adaptive_tol: float = setting(
        0.003, "error tolerance of the adaptive controller (pixel RMS)", parse=number_above(0.0)
    )
    bandit_rounds: int = setting(
        20,
        "rounds (64 samples each) of the epsilon-greedy bandit router (0: leave it out)",
        parse=non_negative,
    )
    cache: Path = setting(Path(CACHE), "reference / schedule cache directory")
    ray: str = setting(
        "auto",
        "auto: a running cluster or RAY_ADDRESS; local: start one here; off: no Ray",
        choices=("auto", "local", "off"),
    )
    metric_network: str = setting(
        "auto",
        "the network for FD and confidence: a directory laid out like the shipped digit "
        "classifier (config.json + model.safetensors); 'auto': the shipped classifier for the "
        "embedded and gmm models, none for other models; 'none': no distribution metrics",
    )
    policy: str | None = setting(
        None,
        "an exported policy directory scored beside the baselines; trained on another model of "
        "the same sample shape and classes, this measures a transfer",
    )


@dataclass
class TrainConfig:
    """Everything a training run needs; ``rldiff.rl.algo.build_config`` makes it a ``PPOConfig``."""

    model: str = setting(MODEL, MODEL_HELP)
    batch_size: int = setting(32, "samples per episode (one env step advances all)", parse=positive)
    budgets: tuple[int, ...] = setting(BUDGETS, "NFE budgets, drawn per sample", parse=budgets)
    guidance: tuple[float, ...] = setting(
        GUIDANCE_MIX,
        "guidance scales, drawn per sample (comma-separated)",
        parse=non_negative_numbers,
    )
    cost_per_nfe: float | tuple[float, ...] = setting(
        0.0,
        "reward cost per NFE; several (comma-separated) are drawn per sample",
        parse=non_negative_numbers,
    )
    n_train: int = setting(
        N_TRAIN,
        "training seeds 0 .. n-1 (the evaluation's own training seeds: one reference bank)",
        parse=positive,
    )
    base_expert: str = setting(
        "unipc",
        "the ppo-single ablation's expert; with one base schedule for all experts, its solver "
        "(with own schedules the table defines reward 0)",
        choices=EXPERT_NAMES,
    )
    experts: tuple[str, ...] | None = setting(
        None, "experts in play (default: all; one: no router)", parse=names(EXPERT_NAMES)
    )
    base_schedules: dict[int, list[float]] | list[dict] | None = setting(
        None,
        "budget -> sigmas of one base schedule, or each expert's own schedules per budget and "
        "guidance ({solver, budget, guidance, sigmas, train_rmse} entries; the lowest training "
        "RMSE per budget and guidance is the table the reward compares against); None: the "
        "logSNR split",
        cli=False,
    )
    step_range: float = setting(
        STEP_RANGE,
        "a step action of +-1 scales the base log-step by this^+-1",
        parse=number_above(1.0),
    )
    reference_steps: int = setting(
        REFERENCE_STEPS, "steps of the training seeds' reference solve", parse=positive
    )
    cache: str = setting(CACHE, "reference / schedule cache directory")
    lr: float = setting(3e-4, "Adam learning rate of every module", parse=number_above(0.0))
    entropy_coeff: float = setting(0.0, "entropy bonus of the expert modules", parse=float)
    router_entropy_coeff: float = setting(
        0.2, "entropy bonus of the router at the start (collapse guard)", parse=float
    )
    router_entropy_final: float | None = setting(
        0.01,
        "router entropy bonus reached after --router-entropy-anneal of the iterations",
        parse=non_negative_number,
    )
    router_entropy_anneal: float = setting(
        0.67,
        "fraction of the iterations over which the router's bonus is annealed",
        parse=number_above(0.0),
    )
    router_warm_start: float | None = setting(
        0.8,
        "initial router probability of the base expert, the rest uniform (0: uniform start)",
        parse=probability_below_one,
    )
    expert_init_std: float | None = setting(
        0.3,
        "initial std of the experts' Gaussian actions in [-1, 1] units",
        parse=number_above(0.0),
    )
    clip: float = setting(0.2, "PPO clip parameter", parse=number_above(0.0))
    gamma: float = setting(1.0, "discount (1: the only reward comes at the end)", parse=float)
    lambda_: float = setting(0.95, "GAE lambda", parse=float)
    hidden: tuple[int, ...] = setting(
        (64, 64), "comma-separated MLP hidden sizes of every module", parse=positive_ints
    )
    train_batch_size: int = setting(
        256, "env steps per iteration (a router or an expert turn of the batch)", parse=positive
    )
    minibatch_size: int | None = setting(
        None,
        f"rows (sample-steps) of each module per SGD minibatch; default "
        f"{MINIBATCH_ROWS_PER_SAMPLE} x --batch-size, so an iteration takes as many SGD steps at "
        "any batch",
        parse=positive,
    )
    num_epochs: int = setting(
        4, "SGD passes of each module over its rows of a train batch", parse=positive
    )
    env_runners: int = setting(
        1, "remote env runners (0: sample in the driver)", parse=non_negative
    )
    iterations: int = setting(40, "training iterations", parse=positive)
    checkpoint_every: int = setting(
        10, "iterations between checkpoints (and one at the end)", parse=positive
    )
    seed: int = setting(0, "seeds RLlib, the modules and the env's draws", parse=int)
    conditions_from: str | None = setting(
        None,
        "a traffic log directory (rldiff serve --traffic-log): each sample's guidance, budget "
        "and class are drawn from the logged requests instead of --guidance x --budgets",
    )
    init_policy: str | None = setting(
        None,
        "an exported policy directory the modules start from (fine-tuning); its experts, "
        "hidden sizes, base schedules, budgets, guidance and cost per NFE are kept",
    )
    conditions: list[list] | None = setting(
        None,
        "[[guidance, budget, label, weight], ...] drawn jointly per sample (label -1: "
        "unconditional); filled from --conditions-from; None: --guidance x --budgets",
        cli=False,
    )
    env_overrides: dict = setting(
        factory=dict, help="any other env_config key (e.g. device)", cli=False
    )

    def env_config(self) -> dict:
        """The ``RoutingEnv`` config (JSON-able, so Tune can search inside it)."""
        out = {k: getattr(self, k) for k in ENV_KEYS}
        out["budgets"], out["guidance"] = list(self.budgets), list(self.guidance)
        if self.experts is not None:
            out["experts"] = [self.experts] if isinstance(self.experts, str) else list(self.experts)
        if isinstance(self.cost_per_nfe, tuple | list):
            out["cost_per_nfe"] = list(self.cost_per_nfe)
        return {**out, **self.env_overrides}

    def minibatch_rows(self) -> int:
        """Rows of each module per SGD minibatch (``minibatch_size`` or its default)."""
        return self.minibatch_size or MINIBATCH_ROWS_PER_SAMPLE * self.batch_size

    def __post_init__(self):
        if isinstance(self.cost_per_nfe, tuple | list) and len(self.cost_per_nfe) == 1:
            self.cost_per_nfe = float(self.cost_per_nfe[0])


# The TrainConfig fields the env reads (and ``device``, an override: cuda where the process sees a
# GPU, else cpu).
ENV_KEYS = (
    "model",
    "batch_size",
    "n_train",
    "guidance",
    "budgets",
    "cost_per_nfe",
    "base_expert",
    "experts",
    "base_schedules",
    "step_range",
    "reference_steps",
    "cache",
    "seed",
    "conditions",
)


@dataclass
class TrainRun:
    """``rldiff train``: the run's own settings (the training's are ``TrainConfig``)."""

    out: Path = setting(MISSING, "output directory of the run")
    resume: bool = setting(False, "continue from the newest checkpoint")
    evaluate: bool = setting(True, "skip the evaluation protocol", flag="--no-evaluate")
    eval_samples: int = setting(HELD_OUT, "held-out samples of the evaluation", parse=positive)
    dashboard: bool = setting(False, "start the Ray dashboard too")
    ablations: bool = setting(
        True,
        "skip the ppo-single ablation (the base expert alone, trained after moe)",
        flag="--no-ablations",
    )


@dataclass
class TuneSettings:
    """``rldiff tune``: the base training config, the space, how trials stop, fail, run and are
    scored. Flags override the chosen preset (``rldiff.search.tune.PRESETS``)."""

    preset: str = setting("quick", "named preset the flags override (see docs/tune.md)", cli=False)
    train: TrainConfig = setting(factory=TrainConfig, cli=False)  # every trial: this + its params
    space: dict = setting(factory=dict, cli=False)  # the search space (the preset's)
    num_samples: int = setting(8, "trials", parse=positive, flag="--trials", aliases=("--samples",))
    grace_period: int = setting(4, "ASHA: iterations before a trial can be stopped", parse=positive)
    reduction_factor: int = setting(
        2, "ASHA: keep the best 1 / this at each rung", parse=integer_at_least(2)
    )
    max_failures: int = setting(
        2, "restarts of a failed trial (from its last checkpoint)", parse=non_negative
    )
    max_concurrent: int | None = setting(
        None, "trials at once (default: as many as the resources hold)", parse=positive
    )
    storage_path: str | None = setting(
        None, "where Tune keeps trials (default: --out; NFS path or s3:// URI)"
    )
    select_samples: int = setting(
        HELD_OUT, "held-out samples each finished trial is scored on", parse=positive
    )
    eval_samples: int = setting(HELD_OUT, "held-out samples of the winner's report", parse=positive)
    target_budgets: tuple[int, ...] | None = setting(
        None, "budgets the winner is picked at (default: all)", parse=budgets
    )
    tie_tolerance: float = setting(
        0.01,
        "relative score difference treated as a tie (then: fewer NFE)",
        parse=number_above(-1e-12),
    )
    search_seed: int = setting(0, "seed of the search space sampling", parse=int)
    time_budget_s: float | None = setting(
        None, "seconds; then every trial stops and the winner is picked", parse=number_above(0.0)
    )


# The TrainConfig settings `rldiff tune` lets a flag override in every trial.
TUNE_TRAIN_FLAGS = ("iterations", "model", "cache", "env_runners")
