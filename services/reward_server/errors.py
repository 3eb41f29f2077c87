"""The errors a client sees: one base class, rendered in one place (``http_errors``).

A ``ClientError`` carries the HTTP status, a stable machine code and a message that says what to
change. Everything the pipeline refuses raises it; the HTTP layer renders it in referee's native
shape ``{"error": code, "message": ...}`` or, on the OpenAI-compatible routes, in OpenAI's shape,
and the queue consumer answers it to the message's sender.
"""

from __future__ import annotations


class ClientError(Exception):
    """A request the server will not judge as sent: ``status`` (4xx, or 5xx for the server's own
    state), ``code`` (stable, for programs), ``message`` (for people), extra response ``headers``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
