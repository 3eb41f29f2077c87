"""The server, built and wired once at start: the judge service (with its blob store and judgment
cache, in Redis when the queue is on), the queue consumer, the routers and the error handlers,
inside the ASGI edge (``edge.ObservedApp``).

Engines load in the background after start-up so that ``/healthz`` answers at once and ``/readyz``
tells orchestrators when the judges can take traffic; judging routes answer 503 until then.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import compat, http_errors, openai_api, routes, slime_api, verl_api
from .edge import OPEN_PATHS, ObservedApp
from .gathering import GroupGatherer
from .idempotency import IdempotencyCache
from .lifecycle import Supervisor
from .media import RedisBlobStore, blob_redis
from .service import JudgeService
from .settings import ServerSettings, get_settings
from .tenancy import Authenticator, check_exposure

__all__ = ["OPEN_PATHS", "ObservedApp", "create_app"]

logger = logging.getLogger(__name__)


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


def create_app(settings: ServerSettings | None = None) -> ObservedApp:
    settings = settings or get_settings()
    check_exposure(settings)  # no keys and a public address: refuse before loading anything

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue, blobs = settings.queue, None
        if queue.enabled:
            # Uploads live in Redis: every replica and every queued job sees the same blobs.
            blobs = RedisBlobStore(blob_redis(queue), queue.prefix, settings.media)
            service = JudgeService(
                settings, blobs=blobs, shared_redis=blobs.redis, shared_prefix=queue.prefix
            )
        else:
            service = JudgeService(settings)
        app.state.service = service
        app.state.idempotency = IdempotencyCache()
        # groups are shared by every route that gathers
        app.state.gatherer = GroupGatherer(max_open=settings.limits.max_open_groups)
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
            await service.health.close()  # the last tallies to Redis
            if blobs is not None:
                await blobs.redis.aclose()
            loading.cancel()
            watching.cancel()
            service.shutdown()

    app = FastAPI(
        title="referee",
        description="Reward models and LLM judges for RL post-training, batched through vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.authenticator = Authenticator(settings)
    app.include_router(routes.judging)
    app.include_router(compat.router)
    app.include_router(openai_api.router)
    app.include_router(slime_api.router)
    app.include_router(verl_api.router)
    app.include_router(routes.ops)

    http_errors.install(app)
    return ObservedApp(app, settings.limits)
