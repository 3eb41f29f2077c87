"""Idempotency keys for the HTTP routes: a retried request is answered, not judged twice.

The SDK sends an ``Idempotency-Key`` header that stays the same across retries of one request. A
request whose key is being judged waits for that judgement; one whose key was answered within
``ttl_s`` gets the same answer. Errors are not remembered (a 429 must be retried for real), and a
key reused with a different body is a client error. The memory is per server process and bounded
per tenant: each tenant keeps at most ``max_entries`` keys, its oldest going first, so one tenant's
keys never push another tenant's out.
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

_Entry = tuple[str, float, asyncio.Future]


def tenant_of(key: str) -> str:
    """The tenant of a key scoped by the routes as ``<tenant>\\0<key>`` (``routes._scoped``)."""
    tenant, sep, _ = key.partition("\0")
    return tenant if sep else ""


class IdempotencyCache:
    """``max_entries``: the keys kept per tenant; ``ttl_s``: how long an answer is kept."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 600.0) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._tenants: dict[str, OrderedDict[str, _Entry]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._tenants.values())

    def entries(self, tenant: str) -> int:
        """The keys kept for ``tenant``."""
        return len(self._tenants.get(tenant, ()))

    async def run(
        self,
        key: str | None,
        route: str,
        body: BaseModel,
        judge: Callable[[], Awaitable[T]],
        *,
        tenant: str | None = None,
    ) -> T:
        """Judge once per ``key`` of ``tenant`` (default: the tenant the key is scoped with)."""
        if not key:
            return await judge()
        tenant = tenant_of(key) if tenant is None else tenant
        digest = hashlib.sha256(f"{route}\0{body.model_dump_json()}".encode()).hexdigest()
        now = time.monotonic()
        entries = self._tenants.setdefault(tenant, OrderedDict())
        self._expire(tenant, entries, now)
        entry = entries.get(key)
        if entry is not None:
            if entry[0] != digest:
                raise ClientError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different request; send a new key for a new request",
                )
            return await asyncio.shield(entry[2])
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entries[key] = (digest, now, future)
        self._expire(tenant, entries, now)  # over its bound: the tenant's own oldest key goes
        try:
            result = await judge()
        except BaseException as exc:
            if entries.get(key, (None, None, None))[2] is future:
                entries.pop(key)  # errors are not remembered: the retry judges anew
            if not entries and self._tenants.get(tenant) is entries:
                del self._tenants[tenant]
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        future.set_result(result)
        return result

    def _expire(self, tenant: str, entries: OrderedDict[str, _Entry], now: float) -> None:
        while entries:
            key, (_, created, future) = next(iter(entries.items()))
            if (now - created > self.ttl_s and future.done()) or len(entries) > self.max_entries:
                entries.pop(key)
            else:
                break
