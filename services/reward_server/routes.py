"""referee's native routes: parse a protocol model, ask the service, return the response model.

The judging routes (``/score``, ``/pairwise``, ``/judge``, ``/winrate``, ``/blobs``) take the
caller's key; the operational ones (``/judges``, ``/healthz``, ``/readyz``, ``/metrics``) are what
orchestrators and operators read. The adapters' routes live in ``compat``, ``openai_api``,
``verl_api`` and ``slime_api``; errors are rendered by ``http_errors``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from referee.auth import valid_tenant
from referee.health import HealthReport
from referee.keys import ID_PATTERN, valid_id
from referee.protocol import (
    BlobInfo,
    ErrorResponse,
    JudgeRequest,
    JudgeResponse,
    JudgesResponse,
    PairwiseRequest,
    PairwiseResponse,
    ScoreRequest,
    ScoreResponse,
    WinRateRequest,
    WinRateResponse,
)

from . import metrics
from .deps import Idempotency, IdempotencyKey, Service, Who
from .errors import ClientError
from .http_errors import render
from .tenancy import Caller, authenticate

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 503)}

judging = APIRouter(responses=_ERRORS, dependencies=[Depends(authenticate)])
ops = APIRouter()


@judging.post("/score", response_model=ScoreResponse, summary="Pointwise scores")
async def score(
    req: ScoreRequest,
    service: Service,
    cache: Idempotency,
    caller: Who,
    idempotency_key: IdempotencyKey = None,
) -> ScoreResponse:
    return await cache.run(
        _scoped(caller, idempotency_key), "score", req, lambda: service.score(req, **caller.who())
    )


@judging.post("/pairwise", response_model=PairwiseResponse, summary="Pairwise preferences")
async def pairwise(
    req: PairwiseRequest,
    service: Service,
    cache: Idempotency,
    caller: Who,
    idempotency_key: IdempotencyKey = None,
) -> PairwiseResponse:
    return await cache.run(
        _scoped(caller, idempotency_key), "pairwise", req, lambda: service.pairwise(req, **caller.who())
    )


@judging.post("/judge", response_model=JudgeResponse, summary="Chain-of-thought judging")
async def judge(
    req: JudgeRequest,
    service: Service,
    cache: Idempotency,
    caller: Who,
    idempotency_key: IdempotencyKey = None,
) -> JudgeResponse:
    return await cache.run(
        _scoped(caller, idempotency_key), "judge", req, lambda: service.judge(req, **caller.who())
    )


@judging.post("/winrate", response_model=WinRateResponse, summary="Pref-GRPO group win rates")
async def winrate(
    req: WinRateRequest,
    service: Service,
    cache: Idempotency,
    caller: Who,
    idempotency_key: IdempotencyKey = None,
) -> WinRateResponse:
    return await cache.run(
        _scoped(caller, idempotency_key), "winrate", req, lambda: service.winrate(req, **caller.who())
    )


@judging.post(
    "/blobs",
    response_model=BlobInfo,
    summary="Upload an image once, reference it many times",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in _IMAGE_TYPES},
        }
    },
)
async def upload_blob(request: Request, service: Service, caller: Who) -> BlobInfo:
    """The body is the image file itself (PNG, JPEG or WebP). The answer's ``id`` is the file's
    SHA-256; send ``{"type": "image", "blob": id}`` wherever an image goes, in any later request of
    the same tenant, until it expires (``expires_in``; uploading it again renews it)."""
    raw = await request.body()
    if not raw:
        raise ClientError(
            400, "bad_request", "the body is empty; send the image file's bytes (PNG, JPEG or WebP)"
        )
    try:
        info = await service.upload(raw, caller.tenant)
    except ClientError:
        metrics.BLOB_UPLOADS.labels("refused").inc()
        raise
    metrics.BLOB_UPLOADS.labels("kept").inc()
    return info


def _scoped(caller: Caller, key: str | None) -> str | None:
    """Idempotency keys are per tenant: another tenant's key never returns this tenant's answer."""
    return None if key is None else f"{caller.tenant}\0{key}"


@ops.get("/judges", response_model=JudgesResponse, dependencies=[Depends(authenticate)])
async def judges(service: Service) -> JudgesResponse:
    return service.describe()


@judging.get("/report", response_model=HealthReport, summary="Judge health of a job")
async def report(
    request: Request,
    service: Service,
    caller: Who,
    job: str | None = None,
    judge: str | None = None,
    tenant: str | None = None,
) -> HealthReport:
    """What the judge gave a job (``job``; none: every recent job of the tenant together), per judge
    and window, with warnings when the reward looks empty or biased (``referee.health``). A tenant
    sees its own jobs; the tenants listed in ``operators`` may name another ``tenant``."""
    settings = request.app.state.settings
    if not settings.health.enabled:
        raise ClientError(404, "not_found", "judge-health telemetry is off on this server (health.enabled)")
    if job is not None and not valid_id(job):
        raise ClientError(422, "invalid_request", f"job {job!r} must match {ID_PATTERN}")
    if judge is not None and judge not in {j.name for j in settings.judges}:
        raise ClientError(
            404,
            "unknown_judge",
            f"no judge {judge!r}; this server has {sorted(j.name for j in settings.judges)}",
        )
    whose = caller.tenant
    if tenant is not None and tenant != caller.tenant:
        if settings.auth and caller.tenant not in settings.operators:
            raise ClientError(403, "forbidden", "only operators may read another tenant's report")
        if not valid_tenant(tenant):
            raise ClientError(422, "invalid_request", f"{tenant!r} is not a valid tenant name")
        whose = tenant
    return await service.health.report(whose, job, judge)


@ops.get("/healthz", responses={503: {"model": ErrorResponse}})
async def healthz(service: Service):
    """Liveness: 503 once the server cannot judge any more (a dead engine, judges that failed to
    load); the process then exits by itself as well."""
    if service.fatal:
        return render(503, "fatal", service.fatal)
    return {"status": "ok"}


@ops.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request, service: Service):
    """Ready when the judges are loaded and, with the queue enabled, its consumer is consuming.
    The body reports the queue's state (``queue``) either way."""
    queue = queue_status(request.app)
    extra = {} if queue is None else {"queue": queue}
    if service.fatal:
        return render(503, "fatal", service.fatal, extra=extra)
    remote = service.remote_status()
    if remote:
        extra["backends"] = remote
    if service.ready:
        out = sorted(
            name for name, backends in remote.items() if not any(b["state"] == "up" for b in backends)
        )
        if out:
            message = f"every backend of remote judge {', '.join(map(repr, out))} is out"
            return render(503, "backend_unavailable", message, {"Retry-After": "5"}, extra=extra)
        if queue is not None and queue["state"] != "consuming":
            message = f"the queue consumer is {queue['state']}"
            if queue.get("last_error"):
                message += f" (last error: {queue['last_error']})"
            return render(503, "queue_unavailable", message, {"Retry-After": "5"}, extra=extra)
        return {"status": "ready", "judges": sorted(service.judges), **extra}
    if service.load_error:
        return render(503, "load_failed", service.load_error, extra=extra)
    return render(503, "loading", "the judges are still loading", {"Retry-After": "5"}, extra=extra)


def queue_status(app) -> dict | None:
    """The queue consumer's state, or None when the queue is off; a consumer task that ended is
    reported as such (it should never end before shutdown)."""
    consumer, task = getattr(app.state, "consumer", None), getattr(app.state, "consuming", None)
    if consumer is None:
        return None
    status = consumer.status()
    if task is not None and task.done() and status["state"] not in ("draining", "stopped"):
        error = "cancelled" if task.cancelled() else repr(task.exception())
        status.update(state="stopped", last_error=f"the consumer task ended: {error}")
    return status


class _TenantView:
    """The metrics registry as one tenant may see it: samples labelled with another tenant left out."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def collect(self):
        for family in REGISTRY.collect():
            family.samples = [s for s in family.samples if s.labels.get("tenant", self.tenant) == self.tenant]
            yield family


@ops.get("/metrics")
async def prometheus_metrics(request: Request, caller: Who) -> Response:
    """Prometheus metrics. With keys, a tenant sees its own tenant's labelled figures only (other
    tenants' names and usage are theirs); the tenants listed in ``operators`` see everything."""
    settings = request.app.state.settings
    if not settings.auth or caller.tenant in settings.operators:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(_TenantView(caller.tenant)), media_type=CONTENT_TYPE_LATEST)
