"""Idempotency keys for the HTTP routes: a retried request is answered, not judged twice.

The SDK sends an ``Idempotency-Key`` header that stays the same across retries of one request. A
request whose key is being judged waits for that judgement; one whose key was answered within
``ttl_s`` gets the same answer. Errors are not remembered (a 429 must be retried for real), and a
key reused with a different body is a client error. The memory is per server process and bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel

from .errors import ClientError

T = TypeVar("T", bound=BaseModel)


class IdempotencyCache:
    def __init__(self, max_entries: int = 10_000, ttl_s: float = 600.0) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._entries: OrderedDict[str, tuple[str, float, asyncio.Future]] = OrderedDict()

    async def run(self, key: str | None, route: str, body: BaseModel, judge: Callable[[], Awaitable[T]]) -> T:
        if not key:
            return await judge()
        digest = hashlib.sha256(f"{route}\0{body.model_dump_json()}".encode()).hexdigest()
        now = time.monotonic()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] != digest:
                raise ClientError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different request; send a new key for a new request",
                )
            return await asyncio.shield(entry[2])
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._entries[key] = (digest, now, future)
        try:
            result = await judge()
        except BaseException as exc:
            self._entries.pop(key, None)  # errors are not remembered: the retry judges anew
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        future.set_result(result)
        return result

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (_, created, future) = next(iter(self._entries.items()))
            if (now - created > self.ttl_s and future.done()) or len(self._entries) > self.max_entries:
                self._entries.pop(key)
            else:
                break
