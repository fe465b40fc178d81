"""Request and response schemas of the HTTP API, and the limits a request is checked against.

The pydantic models check types and shapes (strict: ``"5"`` is not an integer); ``check_generate``
and ``check_batch`` check the configurable limits (``Limits``), and ``label_problem`` the model's
class range, so every rejected request gets a 4xx answer that names the field and what is wrong.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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

    def __post_init__(self):
        if not 1 <= self.max_samples <= self.max_batch_samples:
            raise ValueError("limits need 1 <= max_samples <= max_batch_samples")
        if not 1 <= self.min_budget <= self.max_budget:
            raise ValueError("limits need 1 <= min_budget <= max_budget")
        if not 0 <= self.min_guidance <= self.max_guidance:
            raise ValueError("limits need 0 <= min_guidance <= max_guidance")
        if self.max_batch_requests < 1 or self.max_body_bytes < 1024:
            raise ValueError("limits need max_batch_requests >= 1 and max_body_bytes >= 1024")

    def as_dict(self) -> dict:
        return asdict(self)


class GenerateRequest(BaseModel):
    """One request: ``n`` samples sharing a policy, budget, guidance and output format."""

    model_config = ConfigDict(strict=True, extra="forbid")

    n: int | None = Field(
        None, ge=1, description="samples (default: len(seeds) or len(labels), else 1)"
    )
    labels: int | list[int] | None = Field(
        None, description="class label for all samples, or one per sample; -1 or null: none"
    )
    guidance: float = Field(1.0, allow_inf_nan=False, description="classifier-free guidance scale")
    seeds: int | list[int] | None = Field(
        None,
        description="one seed per sample, or a first seed (seed, seed + 1, ...); null: random "
        "seeds, returned in the response",
    )
    budget: int = Field(5, ge=1, description=BUDGET_SEMANTICS)
    policy: str = Field(
        "learned", max_length=64, description="'learned' or a baseline name (GET /v1/policy)"
    )
    output: Literal["png", "array"] = Field(
        "png", description="png: base64 PNG per sample; array: the raw sample values"
    )

    @field_validator("policy")
    @classmethod
    def _a_name(cls, policy: str) -> str:
        if not POLICY_NAME.match(policy):
            raise ValueError(
                "policy must be a name such as 'learned' or 'fixed:unipc/karras' "
                "(lower-case letters, digits and ':/_-'; never a path)"
            )
        return policy

    @field_validator("seeds")
    @classmethod
    def _in_range(cls, seeds):
        for s in seeds if isinstance(seeds, list) else [seeds or 0]:
            if not 0 <= s < MAX_SEED:
                raise ValueError(f"seeds must lie in [0, 2**62), got {s}")
        return seeds

    @model_validator(mode="after")
    def _consistent(self) -> GenerateRequest:
        lengths = {len(v) for v in (self.seeds, self.labels) if isinstance(v, list)}
        if len(lengths) > 1:
            raise ValueError("seeds and labels lists must have the same length")
        if self.n is None:
            self.n = lengths.pop() if lengths else 1
        elif lengths and lengths != {self.n}:
            raise ValueError(f"n is {self.n} but a seeds or labels list has {lengths.pop()}")
        if isinstance(self.seeds, int) and self.seeds + self.n > MAX_SEED:
            raise ValueError("seeds must lie in [0, 2**62)")
        return self


class GenerateBatchRequest(BaseModel):
    """Many independent requests in one call; each gets its own response, in order."""

    model_config = ConfigDict(strict=True, extra="forbid")

    requests: list[GenerateRequest] = Field(min_length=1)


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


def to_job(
    req: GenerateRequest, limits: Limits, num_classes: int | None = None, prefix: str = ""
) -> Job:
    """Checks ``req`` against ``limits`` and the model's classes (None: checked later, by the
    sampler deployment that has the model); raises ``RequestProblem``."""
    n = req.n
    if n > limits.max_samples:
        raise RequestProblem(
            f"n is {n}; at most {limits.max_samples} samples per request", prefix + "n"
        )
    if not limits.min_budget <= req.budget <= limits.max_budget:
        raise RequestProblem(
            f"budget is {req.budget}; it must lie in [{limits.min_budget}, {limits.max_budget}]",
            prefix + "budget",
        )
    if not limits.min_guidance <= req.guidance <= limits.max_guidance:
        raise RequestProblem(
            f"guidance is {req.guidance}; it must lie in "
            f"[{limits.min_guidance}, {limits.max_guidance}]",
            prefix + "guidance",
        )
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
    return Job(seeds, labels, float(req.guidance), req.budget, req.policy, req.output)


def label_problem(labels: list[int], num_classes: int | None) -> str | None:
    """Why ``labels`` are not classes of a model with ``num_classes`` (None: unknown), or None."""
    top = num_classes if num_classes is not None else MAX_SEED
    bad = [c for c in labels if not -1 <= c < top]
    if not bad:
        return None
    known = f"0..{num_classes - 1}" if num_classes is not None else "a class index"
    return f"label {bad[0]} is not a class of this model: use {known}, or -1 for none"


def to_jobs(
    batch: GenerateBatchRequest, limits: Limits, num_classes: int | None = None
) -> list[Job]:
    """Checks every request of a batch call and the call's totals."""
    if len(batch.requests) > limits.max_batch_requests:
        raise RequestProblem(
            f"{len(batch.requests)} requests; at most {limits.max_batch_requests} per call",
            "requests",
        )
    jobs = [
        to_job(r, limits, num_classes, prefix=f"requests[{i}].")
        for i, r in enumerate(batch.requests)
    ]
    total = sum(len(j.seeds) for j in jobs)
    if total > limits.max_batch_samples:
        raise RequestProblem(
            f"{total} samples in all; at most {limits.max_batch_samples} per call", "requests"
        )
    return jobs


def check_generate(body, limits: Limits) -> Job:
    """A parsed JSON body of ``POST /v1/generate`` as a ``Job``; raises ``RequestProblem``."""
    return to_job(_validate(GenerateRequest, body), limits)


def check_batch(body, limits: Limits) -> list[Job]:
    """A parsed JSON body of ``POST /v1/generate/batch`` as ``Job``s; raises ``RequestProblem``."""
    return to_jobs(_validate(GenerateBatchRequest, body), limits)


def _validate(model: type[BaseModel], body):
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_problem(err) from None


def validation_problem(err: ValidationError) -> RequestProblem:
    """A pydantic error as a 422 that lists each field and what is wrong with it."""
    details = []
    for e in err.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in e["loc"]) or "request"
        details.append({"field": field, "message": e["msg"].removeprefix("Value error, ")})
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    problem = RequestProblem(f"invalid request: {summary}", details[0]["field"] if details else "")
    problem.details = details
    return problem
