"""Error rendering, in one place: every refusal is a ``ClientError`` (``errors``), rendered here in
referee's native shape ``{"error": code, "message": ...}`` or, on the OpenAI-compatible routes
(``/v1/...``, ``/verl/v1/...``), in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` so
that OpenAI's clients raise their own exception types."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineDead
from .errors import ClientError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def openai_path(path: str) -> bool:
    """Routes whose errors take OpenAI's shape: /v1/... and verl's /verl/v1/..."""
    return path.startswith(("/v1/", "/verl/v1/"))


def openai_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape, whatever the path (for the OpenAI-compatible handlers)."""
    return render(status, code, message, headers, path="/v1/")


def stream_error(status: int, code: str, message: str) -> str:
    """An error after a stream has begun (its status is already 200): an event, as vLLM sends."""
    error = {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": None, "code": code}
    return f"data: {json.dumps({'error': error})}\n\n"


def error_body(status: int, code: str, message: str, path: str = "", extra: dict | None = None) -> dict:
    """The body of an error answer, in the shape the route's clients expect."""
    if openai_path(path):
        return {
            "error": {
                "message": message,
                "type": ERROR_TYPES.get(status, "api_error"),
                "param": None,
                "code": code,
            }
        }
    return {"error": code, "message": message, **(extra or {})}


def render(
    status: int,
    code: str,
    message: str,
    headers: dict | None = None,
    *,
    path: str = "",
    extra: dict | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, path, extra), status_code=status, headers=headers)


def error_bytes(status: int, code: str, message: str, path: str = "") -> bytes:
    """The same body, for the ASGI edge (which answers before the app runs)."""
    return json.dumps(error_body(status, code, message, path)).encode()


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    """The app's exception handlers: every error, whoever raised it, through ``render``."""

    @app.exception_handler(EngineDead)
    async def engine_dead(request: Request, exc: EngineDead) -> JSONResponse:
        request.app.state.supervisor.fail(str(exc))
        message = f"{exc}; this server is stopping, retry on another"
        return render(503, "unavailable", message, path=request.url.path)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return render(exc.status, exc.code, exc.message, exc.headers, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors (an unparsable body, an unknown path, a wrong method) in the same
        # {"error", "message"} shape as every other error.
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return render(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if openai_path(request.url.path):  # OpenAI's clients expect 400 and their error shape
            return render(400, "invalid_request", validation_message(exc), path=request.url.path)
        return render(422, "invalid_request", validation_message(exc))
