"""The SDK's defaults, each defined once: where the judge and Redis are, and the queue's key prefix.

``Referee``/``AsyncReferee`` (``DEFAULT_URL``), ``QueueReferee`` (``DEFAULT_REDIS_URL``, overridden by
``$REDIS_URL``, and ``DEFAULT_PREFIX``), the TRL and verl adapters, the CLI and the trainer worker all
import them from here, so that a changed default cannot leave one of them behind. The server's own
defaults (``reward_server.settings``: port 8000, ``queue.prefix``) are meant to agree with these.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PREFIX", "DEFAULT_REDIS_URL", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "referee"
