"""The Ray Serve application: a FastAPI ingress composed with the sampler deployment.

``Ingress`` (CPU, light) answers HTTP: API key, body size, request validation, JSON errors, request
metrics. ``Sampler`` holds the model and the policies (``Catalog``); concurrent requests are merged
by ``@serve.batch`` (and, while the sampler is busy, by ``RunMerger``) into one sampler run
(``run_jobs``) and split back. Its ``user_config`` names the learned policy directory: redeploying
with another one calls ``reconfigure`` and swaps it in place; a directory that fails to load
leaves the old policy serving and is reported by ``GET /v1/policy``. ``build_app`` is the
application builder; it also decides how many GPUs each ``Sampler`` replica asks Ray for
(``sampler_gpus``, ``resolve_sampler_gpus``):

    serve run serve.app:build_app model=gmm policy=train-gmm3/policy policy_root=runs
"""

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from rldiff.config import MODEL, MODEL_HELP
from rldiff.serving.auth import DEFAULT_ENV
from rldiff.serving.merge import RunMerger
from rldiff.serving.schemas import (
    BUDGET_SEMANTICS,
    INGRESS_ONGOING,
    ErrorResponse,
    GenerateBatchResponse,
    GenerateResponse,
    Health,
    Job,
    Limits,
    RequestProblem,
    check_batch,
    check_generate,
    request_models,
)
from rldiff.serving.traffic_log import FLUSH_S, LOGGED_ROUTES

logger = logging.getLogger("ray.serve")
DEFAULT_BATCH_WAIT_S = 0.005  # how long a sampler run waits for more requests to merge
SAMPLER_CPUS = 1  # CPUs per Sampler replica (its GPUs: ``resolve_sampler_gpus``)
SAMPLER_FAILED = {"status": 500, "error": "internal error", "details": []}  # logged, not echoed
INGRESS_CPUS = 0.5  # CPUs per Ingress replica
# Ray Serve settings of the replicas' own processes (``runtime_env`` env vars, merged with the
# application's): user code on the replica's event loop and the handle's router on the same loop,
# not one thread and loop each, which costs two thread hand-overs per call. Measured on 2 cores
# (docs/serving.md, Benchmark): 103 -> 113 requests/s through proxy -> ingress -> inner (echo).
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
# Settings of the Ray cluster itself, read by Serve's HTTP proxy: they must be in the environment
# of the process that starts Ray (``rldiff serve`` and ``jobs/bench_serve.py`` set them, see
# ``cluster_env``; for ``ray start`` export them first). The proxy hands requests to the ingress
# over gRPC instead of Ray actor calls (echo app on 2 cores, with the two above: 126 -> 184).
CLUSTER_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def cluster_env() -> dict[str, str]:
    """Sets ``CLUSTER_ENV`` in this process's environment where it is not set yet (call it before
    Ray starts here); returns what is in effect."""
    import os

    for name, value in CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in CLUSTER_ENV}


def _actor_options(cpus: float, gpus: float = 0) -> dict:
    """A replica's ``ray_actor_options``: CPUs, GPUs where asked, and ``REPLICA_ENV``."""
    options: dict = {"num_cpus": cpus, "runtime_env": {"env_vars": dict(REPLICA_ENV)}}
    if gpus:
        options["num_gpus"] = gpus
    return options


class AppArgs(BaseModel):
    """``build_app`` arguments (``serve run ... key=value``; all optional, unknown ones refused)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(MODEL, description=MODEL_HELP + " (safetensors only)")
    policy: str | None = Field(
        None, description="learned policy directory, relative to policy_root"
    )
    policy_root: str = Field("runs", description="policy directories load only from inside it")
    allow_degraded: bool = Field(
        False,
        description="start even if the policy does not load, serving the best hand-built "
        "schedule per budget (degraded) until a hot swap loads one",
    )
    evaluation: str | None = Field(
        None,
        description="an evaluation directory (results.parquet): the best hand-built schedule per "
        "budget, served when no learned policy loads",
    )
    device: str = Field(
        "cpu", description="the model's device: cpu, cuda, or auto (cuda where the replica has one)"
    )
    allow_tf32: bool = Field(
        False,
        description="TF32 convolutions on a GPU: faster, but samples move from the exact (CPU) "
        "result by up to 1e-3 (UniPC, 6 NFE) and far more for Heun",
    )
    sampler_gpus: Literal["auto"] | Annotated[float, Field(ge=0)] = Field(
        "auto",
        description="GPUs per Sampler replica: auto (1 if the device is not cpu and the cluster "
        "has a GPU, else 0) or a number (a fraction packs several replicas on one GPU)",
    )
    api_key_env: str = Field(
        DEFAULT_ENV, description="the environment variable holding the API key"
    )
    api_key_file: str | None = Field(None, description="a file holding the API key (first line)")
    require_api_key: bool = Field(False, description="refuse to start without an API key")
    batch_wait_s: float = Field(
        DEFAULT_BATCH_WAIT_S, description="how long a sampler run waits for more requests to merge"
    )
    access_log: bool = Field(True, description="no per-request log lines")
    max_samples: int = Field(Limits.max_samples, description="samples per /v1/generate request")
    max_batch_requests: int = Field(
        Limits.max_batch_requests, description="requests per /v1/generate/batch call"
    )
    max_batch_samples: int = Field(
        Limits.max_batch_samples, description="samples per batch call (and per sampler run)"
    )
    min_budget: int = Field(Limits.min_budget, description="smallest NFE budget a request may ask")
    max_budget: int = Field(Limits.max_budget, description="largest NFE budget a request may ask")
    min_guidance: float = Field(Limits.min_guidance, description="smallest guidance scale")
    max_guidance: float = Field(Limits.max_guidance, description="largest guidance scale")
    max_body_bytes: int = Field(Limits.max_body_bytes, description="largest request body (413)")
    max_header_bytes: int = Field(
        Limits.max_header_bytes, description="largest request headers, all together (431)"
    )
    body_timeout_s: float = Field(
        Limits.body_timeout_s, description="seconds a request may take to send its body (408)"
    )
    max_waiting_bodies: int = Field(
        Limits.max_waiting_bodies,
        description="requests waiting for their bodies at once, per ingress replica (then 503)",
    )
    traffic_log: str | None = Field(
        None,
        description="a directory for the traffic log: one Parquet row per served request "
        "(seeds, condition, budget, policy, schedule, NFE, latency); none: no log",
    )
    traffic_log_max_mb: float = Field(
        1024.0, gt=0, description="the traffic log's files together; the oldest are deleted"
    )
    traffic_log_flush_s: float = Field(
        FLUSH_S, gt=0, description="seconds between traffic log writes (one file each)"
    )

    def limits(self) -> Limits:
        return Limits(**{k: getattr(self, k) for k in Limits.__dataclass_fields__})


def _samples_in(items: list[tuple[Job, float]]) -> int:
    """The size of a merged sampler run: samples, not requests."""
    return sum(len(job.seeds) for job, _ in items)


def cluster_gpus() -> float:
    """The GPUs of the Ray cluster this process is connected to; before Ray is started (``rldiff
    serve`` and ``serve run <import path>`` build the application first, then start a local Ray)
    the GPUs of this machine."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    import torch

    return float(torch.cuda.device_count())


def resolve_sampler_gpus(
    requested: str | float, device: str, gpus: Callable[[], float] | None = None
) -> tuple[float, str, str | None]:
    """GPUs per ``Sampler`` replica, why, and a warning where the combination looks wrong.

    ``auto``: none for a model on the CPU (``device: cpu``); else one if the cluster has a GPU
    (``gpus()``, by default ``cluster_gpus``), none if it has none, so that no replica waits
    forever for a GPU that no node has. Ray hides the GPUs from a replica that asks for none, so
    ``device: auto`` then runs on the CPU. A number is taken as given (an autoscaler may still
    add the nodes it needs).
    """
    gpus = gpus or cluster_gpus
    needs_gpu = device not in ("cpu", "auto")  # cuda, cuda:0, ...
    if requested == "auto":
        if device == "cpu":
            return 0.0, "sampler_gpus=auto, device=cpu", None
        available = gpus()
        if available > 0:
            return (
                min(1.0, available),
                f"sampler_gpus=auto, {available:g} GPUs in the cluster",
                None,
            )
        why = "sampler_gpus=auto, no GPU in the cluster"
        warning = f"device={device} needs a GPU: the replica will fail to load the model"
        return 0.0, why, warning if needs_gpu else None
    wanted = float(requested)
    why, warning = f"sampler_gpus={wanted:g}", None
    if wanted > 0 and device == "cpu":
        warning = "device=cpu leaves the replica's GPU unused"
    elif wanted > 0 and (available := gpus()) < wanted:
        warning = (
            f"the cluster has {available:g} GPUs now: replicas wait until nodes with free GPUs "
            "join (an autoscaler may add them)"
        )
    elif wanted == 0 and needs_gpu:
        warning = f"device={device} needs a GPU: the replica will fail to load the model"
    return wanted, why, warning


@serve.deployment(
    ray_actor_options={"num_cpus": SAMPLER_CPUS},  # + num_gpus from build_app
    max_ongoing_requests=256,  # = max_batch_size * max_concurrent_batches: full batches
    health_check_period_s=10,
)
class Sampler:
    """The model, the policies and the batched sampler."""

    def __init__(
        self,
        model: str,
        policy_root: str,
        evaluation: str | None,
        batch: dict,
        device: str,
        allow_tf32: bool = False,
        allow_degraded: bool = False,
    ):
        import ray
        import torch

        from rldiff.data.models import load_model, visible_device
        from rldiff.serving.catalog import Catalog
        from rldiff.serving.metrics import SamplerMetrics

        torch.set_num_threads(1)
        if device == "auto":
            device = visible_device()
        logger.info(f"Sampler: model on {device}, GPUs assigned by Ray: {ray.get_gpu_ids()}")
        denoiser = load_model(model, device)
        denoiser.allow_tf32 = (
            allow_tf32  # only the GPU path reads it (rldiff.core.denoisers.set_tf32)
        )
        self.catalog = Catalog(model, denoiser, policy_root, evaluation)
        self.metrics = SamplerMetrics()
        self.failures = 0  # consecutive failed sampler runs: the health check's signal
        self.run.set_max_batch_size(batch["max_samples"])
        self.run.set_batch_wait_timeout_s(batch["wait_s"])
        self.merger = RunMerger(self._run_merged, batch["max_samples"], size=_samples_in)
        self.metrics.set_degraded(True)  # until reconfigure loads a policy
        self.allow_degraded = allow_degraded

    def reconfigure(self, user_config: dict) -> None:
        """Loads ``user_config["policy"]``; on failure the policy in service stays."""
        policy = (user_config or {}).get("policy")
        first = self.catalog.last_swap is None
        ok = self.catalog.swap(policy)
        if first and not ok and not self.allow_degraded:
            raise RuntimeError(
                f"policy {policy} does not load ({self.catalog.last_swap['error']}) and "
                "allow_degraded is false: the replica does not start"
            )
        self.metrics.record_swap(ok, self.catalog.degraded)
        swap = self.catalog.last_swap
        if ok:
            logger.info(f"policy {policy} loaded")
        else:
            state = "degraded" if self.catalog.degraded else "the previous policy stays"
            logger.warning(f"policy {policy} not loaded ({swap['error']}); {state}")

    async def generate(self, job: Job) -> dict:
        """One request: checked here (the model and policies live here), then batched."""
        from rldiff.serving.engine import check_job

        try:
            problem = check_job(self.catalog, job)
        except Exception:
            logger.exception("checking a request failed")
            return SAMPLER_FAILED
        if problem is not None:
            return problem.body()
        return await self.run((job, time.perf_counter()))

    @serve.batch(
        max_batch_size=Limits.max_batch_samples,
        batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S,
        max_concurrent_batches=4,  # hand batches over at once: RunMerger merges the waiting ones
        batch_size_fn=_samples_in,
    )
    async def run(self, items: list[tuple[Job, float]]) -> list[dict]:
        out = await self.merger.submit(items)
        for response in out:
            try:  # metrics never fail a request
                if "samples" in response:
                    self.metrics.record(response)
            except Exception:
                logger.warning("recording the metrics of a response failed", exc_info=True)
        return out

    def _run_merged(self, items: list[tuple[Job, float]]) -> list[dict]:
        """One sampler run over every merged request (in a thread, one at a time). If the merged
        run fails, each request runs alone, so a request that cannot be served fails by itself
        and every other one is answered."""
        from rldiff.serving.engine import run_jobs

        jobs, arrived = [j for j, _ in items], [t for _, t in items]
        try:
            out = run_jobs(self.catalog, jobs, arrived)
        except Exception:
            if len(jobs) == 1:
                logger.exception("a sampler run failed")
                out = [SAMPLER_FAILED]
            else:
                out = [self._run_alone(job, t) for job, t in zip(jobs, arrived, strict=True)]
        failed = all(answer is SAMPLER_FAILED for answer in out)
        self.failures = self.failures + 1 if failed else 0
        try:  # metrics never fail a request
            self.metrics.record_batch(_samples_in(items))
        except Exception:
            logger.warning("recording a sampler run's size failed", exc_info=True)
        return out

    def _run_alone(self, job: Job, arrived: float) -> dict:
        from rldiff.serving.engine import run_jobs

        try:
            return run_jobs(self.catalog, [job], [arrived])[0]
        except Exception:
            logger.exception("a request failed in the sampler (the others of its run were served)")
            return SAMPLER_FAILED

    def describe(self) -> dict:
        """The catalog's report, and which replica answered (a hot swap keeps the replica)."""
        return {**self.catalog.info(), "replica": serve.get_replica_context().replica_id.unique_id}

    def check_health(self) -> None:
        if self.failures >= 3:
            raise RuntimeError(f"the last {self.failures} sampler runs failed")


app = FastAPI(
    title="rldiff",
    description="Samples drawn with a learned per-sample, per-step sampling schedule "
    "(router + solver experts), with the schedule each sample followed.",
    version="1",
    openapi_url=None,  # served by Ingress: the schema states the configured limits
    docs_url=None,
    redoc_url=None,
)
ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "body is not JSON"),
        (401, "missing or wrong API key"),
        (408, "body not received in time"),
        (413, "body too large"),
        (422, "a field is out of range or of the wrong type"),
        (431, "request headers too large"),
        (500, "a fault of the service (logged, never echoed)"),
        (503, "too many requests waiting for their bodies: retry later"),
    ]
}
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_GONE = 499  # the client closed the connection before its request was read (nginx's code)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    # exc.headers carries Allow on a 405
    return JSONResponse(
        {"status": exc.status_code, "error": str(exc.detail), "details": []},
        exc.status_code,
        headers=exc.headers,
    )


class ClientGone(Exception):
    """The client disconnected before its request was read: nothing to answer, nothing broken."""


# Defined before Ingress: serve.ingress pickles the routes as they are when the class is made.
async def _read_limited(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed) and
    with 408 if it has not arrived ``timeout_s`` after the request began."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestProblem(f"body larger than {limit} bytes", status=413)
    chunks, size = [], 0
    deadline = asyncio.get_running_loop().time() + timeout_s
    stream = request.stream().__aiter__()
    while True:
        left = deadline - asyncio.get_running_loop().time()
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(left, 0.001))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestProblem(f"body not received within {timeout_s:g} s", status=408) from None
        except ClientDisconnect:
            raise ClientGone() from None
        size += len(chunk)
        if size > limit:
            raise RequestProblem(f"body larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise RequestProblem(f"body is not valid JSON: {err}", status=400) from None


def _header_bytes(request: Request) -> int:
    return sum(len(name) + len(value) for name, value in request.headers.raw)


# The playground (rldiff/serving/playground): a page and its two assets, a fixed set of names.
PLAYGROUND_ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# Everything the page loads comes from this service (images arrive as data: URLs in the answers),
# so a browser refuses anything from elsewhere.
PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _playground_file(name: str, media_type: str) -> Response:
    """One of the playground's files, read from the installed package."""
    from importlib.resources import files

    body = files("rldiff.serving").joinpath("playground", name).read_bytes()
    headers = {
        "Content-Security-Policy": PLAYGROUND_CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return Response(body, media_type=media_type, headers=headers)


def openapi_schema(limits: Limits, num_classes: int | None, key_required: bool) -> dict:
    """The published contract: every route, the request bodies with the configured limits (their
    ``$defs`` kept as components), the error answers, and the API key where one is required."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    generate, batch = request_models(limits, num_classes)
    for path, model in (("/v1/generate", generate), ("/v1/generate/batch", batch)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[body["title"]] = body
        ref = {"$ref": f"#/components/schemas/{body['title']}"}
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}},
        }
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]
    metrics["content"] = {PROMETHEUS.split(";")[0]: {"schema": {"type": "string"}}}
    if key_required:
        schema["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "the service's API key"}
        }
        for path, operations in schema["paths"].items():
            if path != "/v1/health":
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}]
    return schema


@serve.deployment(
    ray_actor_options={"num_cpus": INGRESS_CPUS}, max_ongoing_requests=INGRESS_ONGOING
)
@serve.ingress(app)
class Ingress:
    """HTTP: auth, header and body limits, validation, errors as JSON; the work goes to
    ``Sampler``. A request waiting for its body holds a slot for at most ``body_timeout_s``, and at
    most ``max_waiting_bodies`` wait at once (then 503), so slow clients cannot crowd out others;
    a request without a valid key is answered before its body is read."""

    def __init__(
        self,
        sampler,
        limits: dict,
        key: dict,
        num_classes: int | None = None,
        traffic_log: dict | None = None,
    ):
        from rldiff.serving.auth import ApiKey
        from rldiff.serving.metrics import IngressMetrics, TrafficLogMetrics
        from rldiff.serving.traffic_log import TrafficLog

        # by value: the call and its answer travel over the replicas' gRPC channel, not as Ray
        # task and object (echo app on 2 cores, proxy -> ingress -> inner: 113 -> 126 requests/s)
        self.sampler = sampler.options(_by_reference=False)
        self.limits = Limits(**limits)
        self.num_classes = num_classes
        self.key = ApiKey.load(key["env"], key["file"], key["required"])
        self.metrics = IngressMetrics()
        self.waiting_bodies = 0
        self.schema = openapi_schema(self.limits, num_classes, self.key.enabled)
        self.traffic_log = None  # TrafficLog(directory, max_bytes, flush_s), or no log
        if traffic_log:
            self.traffic_log = TrafficLog(**traffic_log, metrics=TrafficLogMetrics())
            logger.info(f"traffic log: {traffic_log['directory']}")
        logger.info(f"API key required: {self.key.enabled}")

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(self, request: Request):
        """Samples under one policy and budget, with each sample's schedule and explanation."""
        return await self._serve(request, "/v1/generate", self._generate)

    @app.post("/v1/generate/batch", response_model=GenerateBatchResponse, responses=ERRORS)
    async def generate_batch(self, request: Request):
        """Many independent requests in one call; answers in the same order."""
        return await self._serve(request, "/v1/generate/batch", self._generate_batch)

    @app.get("/v1/policy", responses=ERRORS)
    async def policy(self, request: Request):
        """The policy and model loaded, their evaluation, degradation, the last swap, limits."""
        return await self._serve(request, "/v1/policy", self._policy)

    @app.get("/v1/health", response_model=Health)
    async def health(self, request: Request):
        """Whether the service answers, and whether it is degraded (no learned policy); no key."""
        return await self._serve(request, "/v1/health", self._health, open_route=True)

    @app.get("/metrics", responses=ERRORS)
    async def prometheus(self, request: Request):
        """The service's Prometheus metrics (``rldiff_*``) from every node, as text."""
        return await self._serve(request, "/metrics", self._metrics)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self):
        return JSONResponse(self.schema)

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="openapi.json", title="rldiff API")

    # The playground holds no data: it needs no key, the API calls it makes carry one.
    @app.get("/", include_in_schema=False)
    async def home(self, request: Request):
        return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + "/playground")

    @app.get("/playground", include_in_schema=False)
    async def playground(self):
        """Two policies compared on the same seeds: images, schedules, confidence, latency."""
        return _playground_file("index.html", "text/html; charset=utf-8")

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(self, name: str):
        if name not in PLAYGROUND_ASSETS:
            raise HTTPException(404, "Not Found")
        return _playground_file(name, PLAYGROUND_ASSETS[name])

    async def _generate(self, body) -> dict:
        job = check_generate(body, self.limits, self.num_classes)
        return await self._submit(job)

    async def _generate_batch(self, body) -> dict:
        jobs = check_batch(body, self.limits, self.num_classes)
        answers = await asyncio.gather(*(self._submit(j) for j in jobs), return_exceptions=True)
        for i, answer in enumerate(answers):
            if isinstance(answer, RequestProblem):
                raise RequestProblem(str(answer), f"requests[{i}].{answer.field}", answer.status)
            if isinstance(answer, BaseException):
                raise answer
        return {"responses": answers}

    async def _policy(self, body) -> dict:
        info = await self.sampler.describe.remote()
        extra = {"limits": self.limits.as_dict(), "budget": BUDGET_SEMANTICS}
        return {**info, **extra, "api_key_required": self.key.enabled}

    async def _health(self, body) -> dict:
        info = await self.sampler.describe.remote()
        swap = info.get("last_swap") or {}
        log = self.traffic_log.state() if self.traffic_log is not None else None
        failing = log is not None and log["state"] == "failing"
        return {
            "status": "degraded" if info["degraded"] or failing else "ok",
            "degraded": info["degraded"],
            "serving": info["serving"],
            "policy": (info["learned"] or {}).get("directory"),
            "reason": swap.get("error") if info["degraded"] else log["error"] if failing else None,
            "traffic_log": log,
        }

    def __del__(self):
        """Serve calls it when the replica stops: the traffic log writes what it holds."""
        if getattr(self, "traffic_log", None) is not None:
            self.traffic_log.close()

    async def _metrics(self, body) -> PlainTextResponse:
        from rldiff.serving.metrics import cluster_metrics

        return PlainTextResponse(await asyncio.to_thread(cluster_metrics), media_type=PROMETHEUS)

    async def _submit(self, job: Job) -> dict:
        answer = await self.sampler.generate.remote(job)
        if "error" in answer:
            detail = (answer["details"] or [{"field": ""}])[0]
            raise RequestProblem(answer["error"], detail["field"], answer["status"])
        return answer

    async def _read_body(self, request: Request):
        if self.waiting_bodies >= self.limits.max_waiting_bodies:
            raise RequestProblem("too many requests waiting for their bodies", status=503)
        self.waiting_bodies += 1
        try:
            raw = await _read_limited(
                request, self.limits.max_body_bytes, self.limits.body_timeout_s
            )
        finally:
            self.waiting_bodies -= 1
        return _parse(raw)

    async def _serve(self, request: Request, route: str, handler, open_route: bool = False):
        start = time.perf_counter()
        headers = None
        try:
            if _header_bytes(request) > self.limits.max_header_bytes:
                raise RequestProblem(
                    f"request headers larger than {self.limits.max_header_bytes} bytes", status=431
                )
            refused = None if open_route else self.key.check(request.headers.get("authorization"))
            if refused:
                raise RequestProblem(refused, status=401)
            body = await self._read_body(request) if request.method == "POST" else None
            result = await handler(body)
            if isinstance(result, dict) and "samples" in result:
                result["timings"]["total_ms"] = (time.perf_counter() - start) * 1e3
            elif isinstance(result, dict) and "responses" in result:
                for r in result["responses"]:
                    r["timings"]["total_ms"] = (time.perf_counter() - start) * 1e3
            status, content = 200, result
            if self.traffic_log is not None and route in LOGGED_ROUTES:
                self.traffic_log.log(route, result)  # queued; never raises, never waits
        except ClientGone:
            logger.info(f"{route}: the client disconnected before sending its whole body")
            self.metrics.record(route, CLIENT_GONE, time.perf_counter() - start)
            return Response(status_code=CLIENT_GONE)  # nobody reads it
        except RequestProblem as problem:
            status, content = problem.status, problem.body()
            if status == 401:
                headers = {"WWW-Authenticate": "Bearer"}
            elif status == 503:
                headers = {"Retry-After": "1"}
            elif status in (408, 413, 431):
                headers = {"Connection": "close"}  # the rest of the body is not read
        except Exception:  # a fault of the service, never of the request: logged, not echoed
            logger.exception(f"{route} failed")
            status, content = 500, SAMPLER_FAILED
        self.metrics.record(route, status, time.perf_counter() - start)
        if isinstance(content, Response):
            return content
        return JSONResponse(content, status, headers=headers)


def build_app(args) -> serve.Application:
    """The application: ``args`` is a dict of ``AppArgs`` fields (strings from the CLI are fine)."""
    from rldiff.data.models import load_model
    from rldiff.serving.catalog import model_classes

    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args or {}))
    limits = args.limits()
    root = Path(args.policy_root).resolve()
    evaluation = str(Path(args.evaluation).resolve()) if args.evaluation else None
    key = {"env": args.api_key_env, "file": args.api_key_file, "required": args.require_api_key}
    if args.api_key_file:
        key["file"] = str(Path(args.api_key_file).resolve())
    batch = {"max_samples": limits.max_batch_samples, "wait_s": args.batch_wait_s}
    num_classes = model_classes(load_model(args.model, "cpu"))  # a model that fails, fails here
    logging_config = {"enable_access_log": args.access_log}
    # Set here, not in the config file: a deployment's ray_actor_options in a Serve config file
    # replace these as a whole (num_gpus included).
    gpus, why, warning = resolve_sampler_gpus(args.sampler_gpus, args.device)
    actor_options = _actor_options(SAMPLER_CPUS, gpus)
    logger.info(f"Sampler replicas: {SAMPLER_CPUS} CPU and {gpus:g} GPU each ({why})")
    if warning:
        logger.warning(f"Sampler replicas: {warning}")
    sampler = Sampler.options(
        ray_actor_options=actor_options,
        user_config={"policy": args.policy},
        logging_config=logging_config,
    ).bind(
        args.model,
        str(root),
        evaluation,
        batch,
        args.device,
        args.allow_tf32,
        args.allow_degraded,
    )
    return Ingress.options(
        ray_actor_options=_actor_options(INGRESS_CPUS), logging_config=logging_config
    ).bind(sampler, limits.as_dict(), key, num_classes, _traffic_log(args))


def _traffic_log(args: AppArgs) -> dict | None:
    """``TrafficLog`` arguments for the ingress replicas, the directory made absolute."""
    if not args.traffic_log:
        return None
    return {
        "directory": str(Path(args.traffic_log).resolve()),
        "max_bytes": int(args.traffic_log_max_mb * 2**20),
        "flush_s": args.traffic_log_flush_s,
    }
