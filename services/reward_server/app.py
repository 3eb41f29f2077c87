"""The HTTP layer: parse a protocol model, call the judge service, return a response model.

Engines load in the background after start-up so that ``/healthz`` answers at once and ``/readyz``
tells orchestrators when the judges can take traffic; judging routes answer 503 until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

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

from . import compat, metrics, openai_api, slime_api, verl_api
from .engine import EngineDead
from .fairness import DEADLINE
from .idempotency import IdempotencyCache
from .lifecycle import Supervisor
from .media import RedisBlobStore, blob_redis
from .service import ClientError, JudgeService
from .settings import Limits, ServerSettings, get_settings
from .tenancy import Authenticator, Caller, authenticate, check_exposure, path_token

logger = logging.getLogger(__name__)

# Open without a key even when keys are required: orchestrators' probes and the API's description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


async def get_service(request: Request) -> JudgeService:  # async: no thread hop per request
    return request.app.state.service


Service = Annotated[JudgeService, Depends(get_service)]
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
Who = Annotated[Caller, Depends(authenticate)]
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}

judging = APIRouter(responses=_ERRORS, dependencies=[Depends(authenticate)])
ops = APIRouter()


async def get_idempotency(request: Request) -> IdempotencyCache:
    return request.app.state.idempotency


Idempotency = Annotated[IdempotencyCache, Depends(get_idempotency)]
IdempotencyKey = Annotated[
    str | None, Header(description="Same key on a retry: the request is answered once, not judged twice.")
]


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


@ops.get("/healthz", responses={503: {"model": ErrorResponse}})
async def healthz(service: Service):
    """Liveness: 503 once the server cannot judge any more (a dead engine, judges that failed to
    load); the process then exits by itself as well."""
    if service.fatal:
        return _error(503, "fatal", service.fatal)
    return {"status": "ok"}


@ops.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request, service: Service):
    """Ready when the judges are loaded and, with the queue enabled, its consumer is consuming.
    The body reports the queue's state (``queue``) either way."""
    queue = _queue_status(request.app)
    extra = {} if queue is None else {"queue": queue}
    if service.fatal:
        return _error(503, "fatal", service.fatal, None, extra)
    if service.ready:
        if queue is not None and queue["state"] != "consuming":
            message = f"the queue consumer is {queue['state']}"
            if queue.get("last_error"):
                message += f" (last error: {queue['last_error']})"
            return _error(503, "queue_unavailable", message, {"Retry-After": "5"}, extra)
        return {"status": "ready", "judges": sorted(service.judges), **extra}
    if service.load_error:
        return _error(503, "load_failed", service.load_error, None, extra)
    return _error(503, "loading", "the judges are still loading", {"Retry-After": "5"}, extra)


def _stop_reading_on_sigterm(consumer):
    """Make SIGTERM stop the queue consumer's reads at once, not after the server has drained its
    HTTP requests (when the lifespan's shutdown begins). Chains to the handler the server installed
    (uvicorn's), and only where there is one; returns what restores it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):  # not under a server that handles SIGTERM: leave it alone
        return None

    def on_sigterm(sig, frame) -> None:
        consumer.stop_reading()
        previous(sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


def _queue_status(app) -> dict | None:
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


@ops.get("/metrics", dependencies=[Depends(authenticate)])
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _error(
    status: int, code: str, message: str, headers: dict | None = None, extra: dict | None = None
) -> JSONResponse:
    body = {"error": code, "message": message, **(extra or {})}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(settings: ServerSettings | None = None) -> ObservedApp:
    settings = settings or get_settings()
    check_exposure(settings)  # no keys and a public address: refuse before loading anything

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = JudgeService(settings)
        app.state.service = service
        app.state.idempotency = IdempotencyCache()
        loading = asyncio.create_task(service.load())
        exit_hook = getattr(app.state, "request_exit", None)
        supervisor = app.state.supervisor = Supervisor(service, request_exit=exit_hook)
        watching = asyncio.create_task(supervisor.run())
        loading.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged in load()
        consumer = consuming = None
        if settings.queue.enabled:
            from .consumer import QueueConsumer

            consumer = QueueConsumer(service, settings.queue)
            consuming = asyncio.create_task(consumer.run())
            # Uploads live in Redis: every replica and every queued job sees the same blobs.
            service.blobs = RedisBlobStore(blob_redis(settings.queue), settings.queue.prefix, settings.media)
            if getattr(service, "cache", None) is not None and settings.cache.shared:
                service.cache.redis, service.cache.prefix = service.blobs.redis, settings.queue.prefix

            def ended(task: asyncio.Task) -> None:  # run() only returns when stopped: say why loudly
                if task.cancelled() or consumer.state in ("draining", "stopped"):
                    return
                logger.error("the queue consumer ended (%s): /readyz reports it", task.exception())

            consuming.add_done_callback(ended)
        app.state.consumer, app.state.consuming = consumer, consuming
        restore = _stop_reading_on_sigterm(consumer) if consumer is not None else None
        try:
            yield
        finally:
            if restore is not None:
                restore()
            if consumer is not None:
                await consumer.stop()  # stop reading, finish or hand back within shutdown_grace_s
                consuming.cancel()
                await service.blobs.redis.aclose()
            loading.cancel()
            watching.cancel()
            service.shutdown()

    app = FastAPI(
        title="referee",
        description="Reward models and LLM judges for RL post-training, batched through vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.authenticator = Authenticator(settings)
    app.include_router(judging)
    app.include_router(compat.router)
    app.include_router(openai_api.router)
    app.include_router(slime_api.router)
    app.include_router(verl_api.router)
    app.include_router(ops)

    @app.exception_handler(EngineDead)
    async def engine_dead(request: Request, exc: EngineDead) -> JSONResponse:
        request.app.state.supervisor.fail(str(exc))
        return _error(503, "unavailable", f"{exc}; this server is stopping, retry on another")

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        if openai_api.openai_path(request.url.path):
            return openai_api.openai_error(exc.status, exc.code, exc.message, exc.headers)
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (an unparsable body, an unknown path, a wrong method) in the same
        # {"error", "message"} shape as every other error.
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if openai_api.openai_path(request.url.path):  # OpenAI's clients expect 400 and their error shape
            return openai_api.openai_error(400, "invalid_request", _validation_message(exc))
        return _error(422, "invalid_request", _validation_message(exc))

    return ObservedApp(app, settings.limits)


class ObservedApp:
    """The ASGI edge around the FastAPI app (a plain wrapper: Starlette's BaseHTTPMiddleware costs a
    task group and a stream per request). For every HTTP request it

    - refuses a body over ``limits.max_body_bytes`` with 413 before anything parses it (by its
      Content-Length, or while reading a body sent without one);
    - gives the request a deadline (``X-Request-Timeout`` seconds, capped by and defaulting to
      ``limits.request_timeout_s``): past it the request is cancelled and answered 504;
    - cancels a request whose client disconnects, so its engine requests are aborted (vLLM aborts a
      request whose generator is cancelled) and its admission slots freed at once;
    - counts and times it by route template and status (499: the client went away).
    """

    def __init__(self, app: FastAPI, limits: Limits | None = None) -> None:
        self.app = app
        self.state = app.state
        self.limits = limits or Limits()

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not path_token(scope):
            await _send_error(
                send, 404, "not_found", "a /k/ path is /k/<api key>/<route>, e.g. /k/KEY/get_reward"
            )
            return
        auth = getattr(self.state, "authenticator", None)
        if auth is not None and auth.enabled and scope["path"] not in OPEN_PATHS:
            # Keys are checked here, before the body is read: a caller without one costs nothing.
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            try:
                tenant = auth.tenant_for(headers.get(b"authorization", b"").decode("latin-1") or None)
            except ClientError as exc:
                metrics.REQUESTS.labels("unauthenticated", "401").inc()
                await _send_error(send, exc.status, exc.code, exc.message, exc.headers, scope["path"])
                return
            scope.setdefault("state", {})["tenant"] = tenant
        start = time.monotonic()
        status = 500
        started = False

        async def observe_send(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            status = await self._serve(scope, receive, observe_send, lambda: started) or status
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            if path != "/metrics":
                metrics.REQUESTS.labels(path, str(status)).inc()
                metrics.LATENCY.labels(path).observe(time.monotonic() - start)

    async def _serve(self, scope, receive, send, started) -> int | None:
        """Run the app under the body limit, the deadline and the disconnect watch; returns a status
        when the edge answered (or gave up) instead of the app."""
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        limit = self.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_error(
                send, 413, "too_large", _body_message(length.decode(), limit), path=scope["path"]
            )
        try:
            timeout = float(headers.get(b"x-request-timeout", b"0").decode() or 0)
        except ValueError:
            return await _send_error(
                send, 400, "bad_request", "X-Request-Timeout must be a number of seconds"
            )
        cap = self.limits.request_timeout_s
        timeout = min(timeout, cap) if timeout > 0 else cap

        body_read = asyncio.Event()
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # No Content-Length (chunked): read the body here, within the limit, then replay it.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return 499
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return await _send_error(
                        send, 413, "too_large", _body_message(f"over {size}", limit), path=scope["path"]
                    )
                more = message.get("more_body", False)
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            body_read.set()

            async def app_receive():
                return replay.pop() if replay else await receive()
        else:

            async def app_receive():
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body", False):
                    body_read.set()
                return message

        async def watch_disconnect() -> None:
            # Only once the app has the whole body does nothing else read from the client.
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        token = DEADLINE.set(time.monotonic() + timeout)  # copied into the app's task
        try:
            app = asyncio.ensure_future(self.app(scope, app_receive, send))
        finally:
            DEADLINE.reset(token)
        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            done, _ = await asyncio.wait({app, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if app in done:
                app.result()  # re-raise what the app raised
                return None
            app.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await app
            if watcher in done:
                logger.info(
                    "%s %s: the client disconnected; its work was cancelled", scope["method"], scope["path"]
                )
                return 499
            if not started():
                return await _send_error(
                    send,
                    504,
                    "deadline_exceeded",
                    f"the request did not finish within its deadline of {timeout:g}s (X-Request-Timeout, "
                    f"at most limits.request_timeout_s={cap:g}); its engine work was cancelled",
                )
            return 504
        finally:
            watcher.cancel()
            if not app.done():
                app.cancel()


def _body_message(size: str, limit: int) -> str:
    return (
        f"the request body ({size} bytes) is over the limit of {limit} bytes (limits.max_body_bytes); "
        "send fewer or shorter items per request"
    )


async def _send_error(
    send, status: int, code: str, message: str, headers: dict | None = None, path: str = ""
) -> int:
    if openai_api.openai_path(path):  # the OpenAI-compatible routes answer in OpenAI's error shape
        error = {"message": message, "type": openai_api.ERROR_TYPES.get(status, "api_error"), "code": code}
        body = json.dumps({"error": {**error, "param": None}}).encode()
    else:
        body = json.dumps({"error": code, "message": message}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return status
