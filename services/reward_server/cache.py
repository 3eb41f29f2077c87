"""The judgment cache: engine answers by content, so that work is never done twice.

GRPO groups often hold identical short completions; the same completion meets the same opponent in
``/winrate`` and in ``/pairwise``; evaluation reruns ask the same pairs again. Each engine request
a judge makes is keyed by everything its answer depends on: the judge and its model (path and a
fingerprint of the weights' files), the exact token ids the engine would see, the images' content
hashes, the sampling options, and the tenant (tenants never share answers, as they never share
prefix-cache blocks). Identical requests in flight at the same time run once (the others wait for
it); finished answers are kept in this process (least recently used out beyond ``max_entries``)
and, when the queue is on, in Redis (``{prefix}:cache:<scope>:<sha256>``, with a TTL), so replicas
share them.

Only deterministic requests are cached: greedy generation, or sampling with a seed; classifier
logits and embeddings always. An answer from the cache is the very value the engine returned
(JSON round-trips floats exactly), so cached and uncached responses are bit-identical. Errors are
never cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from . import metrics

logger = logging.getLogger(__name__)


class _LeaderGone(Exception):
    """The request that was computing an answer others waited for was cancelled."""


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).hexdigest()


class JudgmentCache:
    def __init__(
        self, max_entries: int = 100_000, ttl_s: float = 3600.0, redis=None, prefix: str = "referee"
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._local: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.redis = redis  # with the queue on: answers shared between replicas
        self.prefix = prefix
        self.hits = 0
        self.misses = 0

    def _remember(self, key: str, value: Any) -> None:
        self._local[key] = (time.monotonic() + self.ttl_s, value)
        self._local.move_to_end(key)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)

    def _recall(self, key: str) -> tuple[bool, Any]:
        hit = self._local.get(key)
        if hit is None:
            return False, None
        expires, value = hit
        if expires <= time.monotonic():
            del self._local[key]
            return False, None
        self._local.move_to_end(key)
        return True, value

    def _redis_key(self, scope: str, key: str) -> str:
        return f"{self.prefix}:cache:{scope}:{key}"

    async def _from_redis(self, scope: str, key: str, decode: Callable[[Any], Any]) -> tuple[bool, Any]:
        if self.redis is None:
            return False, None
        try:
            raw = await self.redis.get(self._redis_key(scope, key))
        except Exception as exc:  # the cache is an optimisation: Redis trouble means a miss
            logger.warning("judgment cache: Redis read failed (%s); judging instead", exc)
            return False, None
        if raw is None:
            return False, None
        return True, decode(json.loads(raw))

    async def _to_redis(self, scope: str, key: str, value: Any, encode: Callable[[Any], Any]) -> None:
        if self.redis is None:
            return
        try:
            await self.redis.set(
                self._redis_key(scope, key), json.dumps(encode(value)), px=int(self.ttl_s * 1000)
            )
        except Exception as exc:
            logger.warning("judgment cache: Redis write failed (%s)", exc)

    async def get_or_run(
        self,
        judge: str,
        scope: str,
        key: str,
        run: Callable[[], Awaitable[Any]],
        encode: Callable[[Any], Any] = lambda v: v,
        decode: Callable[[Any], Any] = lambda v: v,
    ) -> tuple[Any, bool]:
        """The answer for ``key`` and whether it came from the cache (or from an identical request
        in flight); otherwise ``run()`` computes it, once for everyone asking at the same time."""
        full = f"{scope}:{key}"
        while True:
            found, value = self._recall(full)
            if found:
                return self._hit(judge, value)
            leader = self._inflight.get(full)
            if leader is None:
                break
            try:
                return self._hit(judge, await asyncio.shield(leader))
            except _LeaderGone:
                continue  # its caller went away: compute it ourselves
        # in flight from here on (before any await), so that identical requests arriving meanwhile
        # wait for this one instead of running too
        future = asyncio.get_running_loop().create_future()
        self._inflight[full] = future
        try:
            found, value = await self._from_redis(scope, key, decode)
            if found:
                future.set_result(value)
                self._remember(full, value)
                return self._hit(judge, value)
            value = await run()
        except asyncio.CancelledError:
            if not future.done():
                future.set_exception(_LeaderGone())
                future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()
            raise
        finally:
            self._inflight.pop(full, None)
        future.set_result(value)
        self._remember(full, value)
        self.misses += 1
        metrics.CACHE.labels(judge, "miss").inc()
        await self._to_redis(scope, key, value, encode)
        return value, False

    def _hit(self, judge: str, value: Any) -> tuple[Any, bool]:
        self.hits += 1
        metrics.CACHE.labels(judge, "hit").inc()
        return value, True
