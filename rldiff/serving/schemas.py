"""Request and response schemas of the HTTP API, and the limits a request is checked against.

The pydantic models check types and shapes (strict: ``"5"`` is not an integer); ``check_generate``
and ``check_batch`` check the configurable limits (``Limits``), and ``label_problem`` the model's
class range, so every rejected request gets a 4xx answer that names the field and what is wrong.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

INGRESS_ONGOING = 1024  # requests in one ingress replica at once (its max_ongoing_requests)
MAX_SEED = 2**62  # seeds are per-sample generator seeds (the step-noise stream adds 2**40)
POLICY_NAME = re.compile(r"^[a-z0-9][a-z0-9:/_-]{0,63}$")  # names only: no dots, no paths
BUDGET_SEMANTICS = (
    "budget is a hard per-sample cap on network evaluations (NFE): no sample uses more, a policy "
    "may use fewer; the learned policy serves the budgets it was trained on"
)


@dataclass(frozen=True)
class Limits:
    """What one call may ask for; every field is a ``build_app`` argument of the same name."""

    max_samples: int = 16  # samples per /v1/generate request
    max_batch_requests: int = 16  # requests per /v1/generate/batch call
    max_batch_samples: int = 64  # samples per /v1/generate/batch call (and per sampler run)
    min_budget: int = 1
    max_budget: int = 20
    min_guidance: float = 0.0
    max_guidance: float = 10.0
    max_body_bytes: int = 65536
    max_header_bytes: int = 16384  # all request headers together (431)
    body_timeout_s: float = 10.0  # from the request's start to its whole body (408)
    max_waiting_bodies: int = 512  # requests waiting for their bodies at once, per ingress (503)

    def __post_init__(self):
        if not 1 <= self.max_samples <= self.max_batch_samples:
            raise ValueError("limits need 1 <= max_samples <= max_batch_samples")
        if not 1 <= self.min_budget <= self.max_budget:
            raise ValueError("limits need 1 <= min_budget <= max_budget")
        if not 0 <= self.min_guidance <= self.max_guidance:
            raise ValueError("limits need 0 <= min_guidance <= max_guidance")
        if self.max_batch_requests < 1 or self.max_body_bytes < 1024:
            raise ValueError("limits need max_batch_requests >= 1 and max_body_bytes >= 1024")
        if self.max_header_bytes < 1024 or self.body_timeout_s <= 0:
            raise ValueError("limits need max_header_bytes >= 1024 and body_timeout_s > 0")
        if not 1 <= self.max_waiting_bodies < INGRESS_ONGOING:
            raise ValueError(f"limits need 1 <= max_waiting_bodies < {INGRESS_ONGOING}")

    def as_dict(self) -> dict:
        return asdict(self)


def _integral(value):
    """JSON has one number type: ``5.0`` is the integer 5 (JSON Schema agrees); ``5.5``, ``"5"``
    and ``true`` stay what they are and fail the strict integer check."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def Integer(**bounds):  # noqa: N802 (a type)
    """A strict integer within ``bounds`` (``ge``, ``le``, ``lt``) that also takes ``5.0``."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


@lru_cache(maxsize=16)
def request_models(limits: Limits, num_classes: int | None = None) -> tuple[type, type]:
    """``(GenerateRequest, GenerateBatchRequest)`` for these limits and a model with
    ``num_classes`` classes (None: not known here). Every limit is a constraint of the models, so
    the published schema (``/openapi.json``) states each one and the validator enforces the same;
    only relations between fields (lengths that must agree) are checked in code."""
    top_label = MAX_SEED - 1 if num_classes is None else max(num_classes, 0) - 1
    label = Integer(ge=-1, le=max(top_label, -1))
    seed = Integer(ge=0, lt=MAX_SEED)
    first_seed = Integer(ge=0, le=MAX_SEED - limits.max_samples)

    def per_sample(item):
        return Annotated[list[item], Field(min_length=1, max_length=limits.max_samples)]

    class GenerateRequest(BaseModel):
        """One request: ``n`` samples sharing a policy, budget, guidance and output format. Lists
        of seeds and labels have one entry per sample (the same length, and ``n`` if given)."""

        model_config = ConfigDict(strict=True, extra="forbid", title="GenerateRequest")

        n: Integer(ge=1, le=limits.max_samples) | None = Field(
            None, description="samples (default: len(seeds) or len(labels), else 1)"
        )
        labels: label | per_sample(label) | None = Field(
            None, description="class label for all samples, or one per sample; -1 or null: none"
        )
        guidance: float = Field(
            1.0,
            ge=limits.min_guidance,
            le=limits.max_guidance,
            allow_inf_nan=False,
            description="classifier-free guidance scale",
        )
        seeds: first_seed | per_sample(seed) | None = Field(
            None,
            description="one seed per sample, or a first seed (seed, seed + 1, ...); null: random "
            "seeds, returned in the response",
        )
        budget: Integer(ge=limits.min_budget, le=limits.max_budget) = Field(
            5, description=BUDGET_SEMANTICS
        )
        policy: str = Field(
            "learned",
            pattern=POLICY_NAME.pattern,
            description="'learned' or a baseline name (GET /v1/policy); a name, never a path",
        )
        output: Literal["png", "array"] = Field(
            "png", description="png: base64 PNG per sample; array: the raw sample values"
        )

        @model_validator(mode="after")
        def _consistent(self):
            lengths = {len(v) for v in (self.seeds, self.labels) if isinstance(v, list)}
            if len(lengths) > 1:
                raise ValueError("seeds and labels lists must have the same length")
            if self.n is None:
                self.n = lengths.pop() if lengths else 1
            elif lengths and lengths != {self.n}:
                raise ValueError(f"n is {self.n} but a seeds or labels list has {lengths.pop()}")
            return self

    class GenerateBatchRequest(BaseModel):
        """Many independent requests in one call; each gets its own response, in order."""

        model_config = ConfigDict(strict=True, extra="forbid", title="GenerateBatchRequest")

        requests: list[GenerateRequest] = Field(min_length=1, max_length=limits.max_batch_requests)

    return GenerateRequest, GenerateBatchRequest


GenerateRequest, GenerateBatchRequest = request_models(Limits())  # the defaults, for the docs


class Step(BaseModel):
    sigma: float
    sigma_next: float
    expert: str
    eta: float = Field(description="noise amount eta of a stochastic step (0: deterministic)")
    nfe: int = Field(description="network evaluations used once this step is done")
    confidence: float | None = Field(
        None, description="the router's probability for the expert it chose (learned policy)"
    )


class Sample(BaseModel):
    seed: int
    label: int
    guidance: float
    nfe: int = Field(description="network evaluations this sample used (<= budget)")
    shape: list[int]
    png_base64: str | None = None
    array: list | None = Field(None, description="nested lists of the raw values, shape `shape`")
    schedule: list[Step]
    explanation: str


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting in the sampler deployment for a batch")
    sampler_ms: float = Field(description="the sampler run this request was merged into")
    batch_samples: int = Field(description="samples in that sampler run (all merged requests)")
    total_ms: float | None = Field(None, description="in the service, from receipt to response")


class GenerateResponse(BaseModel):
    policy: str = Field(description="the policy that ran: 'moe'-style learned name or a baseline")
    requested_policy: str
    degraded: bool = Field(description="true: no learned policy loaded, best hand-built served")
    model: str
    budget: int
    samples: list[Sample]
    timings: Timings


class GenerateBatchResponse(BaseModel):
    responses: list[GenerateResponse]


class TrafficLogState(BaseModel):
    state: Literal["ok", "failing"] = Field(description="failing: writes fail, rows stay buffered")
    rows_written: int
    rows_dropped: int = Field(description="lost: buffer full, or still unwritten at shutdown")
    rows_pending: int = Field(description="in the buffer, not written yet")
    files_written: int
    error: str | None = Field(description="why writes fail, while failing")


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="degraded: no learned policy loaded, or the traffic log failing"
    )
    degraded: bool = Field(description="true: no learned policy loaded, best hand-built served")
    serving: str
    policy: str | None = Field(description="the learned policy's directory, if one is loaded")
    reason: str | None = Field(
        description="why no learned policy is loaded, else why the traffic log fails"
    )
    traffic_log: TrafficLogState | None = Field(
        None, description="the answering ingress replica's traffic log; null: not configured"
    )


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    status: int
    error: str
    details: list[ErrorDetail] = []


@dataclass
class Job:
    """A checked request as the sampler deployment receives it (plain data: cheap to ship)."""

    seeds: list[int]
    labels: list[int]
    guidance: float
    budget: int
    policy: str
    output: str


class RequestProblem(ValueError):
    """A request that cannot be served as asked; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, field: str = "", status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status
        self.details = [{"field": field, "message": message}] if field else []

    def body(self) -> dict:
        return {"status": self.status, "error": str(self), "details": self.details}


def to_job(req, num_classes: int | None = None, prefix: str = "") -> Job:
    """A validated ``GenerateRequest`` as a ``Job``, its labels checked against the model's classes
    (None: checked later, by the sampler deployment that has the model); raises
    ``RequestProblem``."""
    n = req.n
    labels = (
        req.labels
        if isinstance(req.labels, list)
        else [-1 if req.labels is None else req.labels] * n
    )
    problem = label_problem(labels, num_classes)
    if problem:
        raise RequestProblem(problem, prefix + "labels")
    if isinstance(req.seeds, list):
        seeds = list(req.seeds)
    elif req.seeds is None:
        first = secrets.randbelow(2**31)
        seeds = list(range(first, first + n))
    else:
        seeds = list(range(req.seeds, req.seeds + n))
    if not seeds or len(seeds) != len(labels):  # the schema guarantees it; never a 0-sample job
        raise RequestProblem("a request needs at least one sample", prefix + "n")
    return Job(seeds, labels, float(req.guidance), req.budget, req.policy, req.output)


def label_problem(labels: list[int], num_classes: int | None) -> str | None:
    """Why ``labels`` are not classes of a model with ``num_classes`` (None: unknown), or None."""
    top = num_classes if num_classes is not None else MAX_SEED
    bad = [c for c in labels if not -1 <= c < top]
    if not bad:
        return None
    known = f"0..{num_classes - 1}" if num_classes is not None else "a class index"
    return f"label {bad[0]} is not a class of this model: use {known}, or -1 for none"


def check_generate(body, limits: Limits, num_classes: int | None = None) -> Job:
    """A parsed JSON body of ``POST /v1/generate`` as a ``Job``; raises ``RequestProblem``."""
    model, _ = request_models(limits, num_classes)
    return to_job(_validate(model, body), num_classes)


def check_batch(body, limits: Limits, num_classes: int | None = None) -> list[Job]:
    """A parsed JSON body of ``POST /v1/generate/batch`` as ``Job``s; raises ``RequestProblem``.
    Each request is one sampler job (merged with the others in flight), so a call may carry up to
    ``max_batch_requests`` x ``max_samples`` samples."""
    _, model = request_models(limits, num_classes)
    batch = _validate(model, body)
    return [to_job(r, num_classes, prefix=f"requests[{i}].") for i, r in enumerate(batch.requests)]


def _validate(model: type[BaseModel], body):
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_problem(err) from None


UNION_BRANCH = re.compile(r"^(constrained-\w+|[\w-]+\[.*\]|int|float|str|bool|list|dict|none)$")
FIELDS = {"n", "labels", "guidance", "seeds", "budget", "policy", "output", "requests"}


def validation_problem(err: ValidationError) -> RequestProblem:
    """A pydantic error as a 422 that lists each field and what is wrong with it. A value that fits
    no member of a union (``seeds``: a seed or a list) is reported once, by the member it came
    closest to (a range or length error rather than a type error)."""
    found = []  # (top-level field, path, a type error?, message)
    for e in err.errors(include_url=False, include_input=False):
        parts = [p for p in e["loc"] if not _union_tag(p)]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
        path = path.removeprefix(".") or "request"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "string_pattern_mismatch" and parts and parts[-1] == "policy":
            message = (
                "policy must be a name such as 'learned' or 'fixed:unipc/karras' (lower-case "
                "letters, digits and ':/_-'; never a path)"
            )
        found.append((str(parts[0]) if parts else "", path, e["type"].endswith("_type"), message))
    closer = {top for top, _, is_type, _ in found if not is_type}
    by_path: dict[str, list[str]] = {}
    for top, path, is_type, message in found:
        if not (is_type and top in closer):  # the union member the value came closest to
            by_path.setdefault(path, []).append(message)
    details = [
        {"field": path, "message": " or ".join(m.removeprefix("Input should be ") if i else m
                                                for i, m in enumerate(messages[:2]))}
        for path, messages in by_path.items()
    ]  # fmt: skip
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    problem = RequestProblem(f"invalid request: {summary}", details[0]["field"] if details else "")
    problem.details = details
    return problem


def _union_tag(part) -> bool:
    return isinstance(part, str) and part not in FIELDS and bool(UNION_BRANCH.match(part))
