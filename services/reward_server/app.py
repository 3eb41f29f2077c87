"""The HTTP layer: parse a protocol model, call the judge service, return a response model.

Engines load in the background after start-up so that ``/healthz`` answers at once and ``/readyz``
tells orchestrators when the judges can take traffic; judging routes answer 503 until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from referee.protocol import (
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

from . import compat, metrics
from .idempotency import IdempotencyCache
from .service import ClientError, JudgeService
from .settings import ServerSettings, get_settings

logger = logging.getLogger(__name__)


async def get_service(request: Request) -> JudgeService:  # async: no thread hop per request
    return request.app.state.service


Service = Annotated[JudgeService, Depends(get_service)]
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 429, 503)}

judging = APIRouter(responses=_ERRORS)
ops = APIRouter()


async def get_idempotency(request: Request) -> IdempotencyCache:
    return request.app.state.idempotency


Idempotency = Annotated[IdempotencyCache, Depends(get_idempotency)]
IdempotencyKey = Annotated[
    str | None, Header(description="Same key on a retry: the request is answered once, not judged twice.")
]


@judging.post("/score", response_model=ScoreResponse, summary="Pointwise scores")
async def score(
    req: ScoreRequest, service: Service, cache: Idempotency, idempotency_key: IdempotencyKey = None
) -> ScoreResponse:
    return await cache.run(idempotency_key, "score", req, lambda: service.score(req))


@judging.post("/pairwise", response_model=PairwiseResponse, summary="Pairwise preferences")
async def pairwise(
    req: PairwiseRequest, service: Service, cache: Idempotency, idempotency_key: IdempotencyKey = None
) -> PairwiseResponse:
    return await cache.run(idempotency_key, "pairwise", req, lambda: service.pairwise(req))


@judging.post("/judge", response_model=JudgeResponse, summary="Chain-of-thought judging")
async def judge(
    req: JudgeRequest, service: Service, cache: Idempotency, idempotency_key: IdempotencyKey = None
) -> JudgeResponse:
    return await cache.run(idempotency_key, "judge", req, lambda: service.judge(req))


@judging.post("/winrate", response_model=WinRateResponse, summary="Pref-GRPO group win rates")
async def winrate(
    req: WinRateRequest, service: Service, cache: Idempotency, idempotency_key: IdempotencyKey = None
) -> WinRateResponse:
    return await cache.run(idempotency_key, "winrate", req, lambda: service.winrate(req))


@ops.get("/judges", response_model=JudgesResponse)
async def judges(service: Service) -> JudgesResponse:
    return service.describe()


@ops.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@ops.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(service: Service):
    if service.ready:
        return {"status": "ready", "judges": sorted(service.judges)}
    if service.load_error:
        return _error(503, "load_failed", service.load_error)
    return _error(503, "loading", "the judges are still loading", {"Retry-After": "5"})


@ops.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(settings: ServerSettings | None = None) -> ObservedApp:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = JudgeService(settings)
        app.state.service = service
        app.state.idempotency = IdempotencyCache()
        loading = asyncio.create_task(service.load())
        loading.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged in load()
        consumer = consuming = None
        if settings.queue.enabled:
            from .consumer import QueueConsumer

            consumer = QueueConsumer(service, settings.queue)
            consuming = asyncio.create_task(consumer.run())
        try:
            yield
        finally:
            if consumer is not None:
                await consumer.stop()
                consuming.cancel()
            loading.cancel()
            service.shutdown()

    app = FastAPI(
        title="referee",
        description="Reward models and LLM judges for RL post-training, batched through vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(judging)
    app.include_router(compat.router)
    app.include_router(ops)

    @app.exception_handler(ClientError)
    async def client_error(_: Request, exc: ClientError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", _validation_message(exc))

    return ObservedApp(app)


class ObservedApp:
    """Counts and times every HTTP request by route template and status (a plain ASGI wrapper:
    Starlette's BaseHTTPMiddleware costs a task group and a stream per request)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500

        async def observe_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            if path != "/metrics":
                metrics.REQUESTS.labels(path, str(status)).inc()
                metrics.LATENCY.labels(path).observe(time.monotonic() - start)
