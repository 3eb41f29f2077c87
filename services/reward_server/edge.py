"""The ASGI edge around the FastAPI app: keys checked before the body is read, body limits,
deadlines, client disconnects, and per-route request metrics (``ObservedApp``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI

from . import metrics
from .errors import ClientError
from .fairness import DEADLINE
from .http_errors import error_bytes
from .settings import Limits
from .tenancy import path_token

logger = logging.getLogger(__name__)

# Open without a key even when keys are required: orchestrators' probes and the API's description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


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
    body = error_bytes(status, code, message, path)  # OpenAI's shape on the OpenAI-compatible routes
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
