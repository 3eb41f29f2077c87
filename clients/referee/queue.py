"""``QueueReferee``: the methods of ``AsyncReferee``, carried by Redis Streams instead of HTTP.

A request is appended to its job's stream; any server replica's consumer judges it and writes the
answer to a per-request list that this client blocks on. Many training jobs can share one judge
this way: consumers take turns between the jobs' streams, a consumer that dies leaves its messages
to be reclaimed by another, and every request gets exactly one answer (or an error), never silence.

Faults: while Redis is unreachable (restarting, loading its append-only file) sends and waits are
retried with jittered backoff until the request's timeout, then ``QueueUnavailable`` is raised; no
redis-py exception escapes. A message that Redis lost (a restart that dropped its last writes) is
noticed while waiting — neither in the stream nor answered — and sent again with the same request
id, which the consumers answer at most once. Each message carries a deadline (now + ``timeout``):
a consumer that reaches it later answers ``expired`` without judging it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from typing import TypeVar

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .client import BacklogFull, QueueUnavailable, RefereeTimeout, api_error
from .keys import DEFAULT_PREFIX, Keys
from .protocol import (
    RESPONSE_MODELS,
    JudgeRequest,
    JudgeResponse,
    JudgesResponse,
    PairwiseRequest,
    PairwiseResponse,
    QueueMessage,
    QueueReply,
    ScoreRequest,
    ScoreResponse,
    WinRateRequest,
    WinRateResponse,
)

T = TypeVar("T", bound=BaseModel)

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_BACKLOG = 10_000  # the server's QueueSettings.max_backlog default
_POLL_S = 2.0
_MAX_CONNECTIONS = 10_000  # Redis' own default maxclients

# Append a message unless the job's stream is at its cap (the consumers' published cap, else the
# sender's), and mark the job active. XLEN counts waiting and in-flight messages: consumers delete
# what they acknowledge. Returns {1, entry id} or {0, length, cap}.
_SEND = """
local cap = tonumber(redis.call('HGET', KEYS[3], 'max_backlog')) or tonumber(ARGV[2])
local n = redis.call('XLEN', KEYS[1])
if cap > 0 and n >= cap then
  return {0, n, cap}
end
local id = redis.call('XADD', KEYS[1], '*', 'msg', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return {1, id}
"""


def redis_url() -> str:
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


def _transient(exc: RedisError) -> bool:
    """Errors that end by themselves: no connection, a timeout, a Redis still loading its data
    (a ``ConnectionError``), or one out of memory until consumers drain it."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) or (
        isinstance(exc, ResponseError) and str(exc).startswith("OOM")
    )


def _backoff(failures: int, cap: float = 2.0) -> float:
    delay = min(cap, 0.05 * 2**failures)
    return delay / 2 + random.uniform(0, delay / 2)


class QueueReferee:
    """Async judge client over Redis. ``async with QueueReferee(job_id="run-1") as ref: ...``

    ``timeout`` bounds each call: sending (with retries while Redis is down) and waiting for the
    answer; it also sets the message's deadline. ``max_backlog`` caps the job's stream when no
    consumer has published the server's cap (the server's value wins: the operator sizes Redis).
    ``lost_check_s`` is how often a waiting call checks that its message still exists.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        job_id: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 600.0,
        redis: Redis | None = None,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        lost_check_s: float = 10.0,
    ) -> None:
        self.keys = Keys(prefix)
        self.job_id = job_id
        self.timeout = timeout
        self.max_backlog = max_backlog
        self.lost_check_s = lost_check_s
        self._redis = redis or Redis.from_url(
            url or redis_url(),
            decode_responses=True,
            socket_timeout=_POLL_S + 5,
            socket_connect_timeout=5,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),  # stale connections
            # Every call waiting for its answer holds a connection (BLPOP): redis-py 8 caps a pool at
            # 100 by default, and the 101st concurrent call failed with "Too many connections".
            max_connections=_MAX_CONNECTIONS,
        )
        self._send_script = self._redis.register_script(_SEND)
        self._sent: dict[str, tuple[str, str]] = {}  # request id -> (entry id, message JSON), unanswered
        self.last_reply: QueueReply | None = None
        self.resent = 0  # messages sent again after Redis lost them

    async def send(
        self, type_: str, request: BaseModel, request_id: str | None = None, *, deadline: float | None = None
    ) -> str:
        """Append a request to this job's stream; returns its request id (the idempotency key).

        ``deadline`` (epoch seconds, default now + ``timeout``) also bounds the retries while Redis
        is unreachable. Raises ``BacklogFull`` when the job's stream is at its cap."""
        now = time.time()
        msg = QueueMessage(
            type=type_,
            job_id=self.job_id,
            request_id=request_id or uuid.uuid4().hex,
            sent_at=now,
            deadline=now + self.timeout if deadline is None else deadline,
            body=request.model_dump(mode="json", exclude_none=True),
        )
        raw = msg.model_dump_json()
        entry = await self._append(raw, msg.request_id, msg.deadline)
        self._sent[msg.request_id] = (entry, raw)
        return msg.request_id

    async def _append(self, raw: str, request_id: str, deadline: float) -> str:
        failures = 0
        while True:
            try:
                added = await self._send_script(
                    keys=[self.keys.stream(self.job_id), self.keys.jobs, self.keys.limits],
                    args=[raw, self.max_backlog, self.job_id, time.time()],
                )
                break
            except RedisError as exc:
                failures += 1
                delay = _backoff(failures)
                if not _transient(exc) or time.time() + delay >= deadline:
                    raise QueueUnavailable(f"cannot send request {request_id} through Redis: {exc}") from exc
                logger.warning("sending %s: Redis error (%s), retrying in %.2fs", request_id, exc, delay)
                await asyncio.sleep(delay)
        if int(added[0]) == 0:
            raise BacklogFull(
                429,
                "backlog_full",
                f"job {self.job_id}'s stream holds {added[1]} messages, at its cap of {added[2]} "
                "(the server's queue.max_backlog): wait for answers before sending more",
            )
        return added[1]

    async def receive(self, type_: str, request_id: str, timeout: float | None = None) -> BaseModel:
        """Wait for the answer to ``request_id``; raise the SDK's exception for an error answer."""
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + timeout
        next_check = start + self.lost_check_s
        failures, error = 0, None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if error is not None:
                        raise QueueUnavailable(
                            f"no answer to {type_} request {request_id} within {timeout:.0f}s; "
                            f"Redis is unreachable: {error}"
                        ) from error
                    raise RefereeTimeout(f"no answer to {type_} request {request_id} within {timeout:.0f}s")
                try:
                    # Short blocking pops: one blocking read stays well inside the socket timeout.
                    popped = await self._redis.blpop(
                        [self.keys.reply(request_id)], timeout=min(remaining, _POLL_S)
                    )
                    if popped is not None:
                        break
                    if time.monotonic() >= next_check:
                        await self._resend_if_lost(request_id, time.time() + remaining)
                        next_check = time.monotonic() + self.lost_check_s
                    failures, error = 0, None
                except RedisError as exc:
                    if not _transient(exc):
                        raise QueueUnavailable(f"waiting for request {request_id}: {exc}") from exc
                    failures, error = failures + 1, exc
                    await asyncio.sleep(min(_backoff(failures), max(0.0, deadline - time.monotonic())))
                    # Redis came back after an outage: check at once that it still holds the message.
                    next_check = time.monotonic()
        finally:
            self._sent.pop(request_id, None)
        reply = QueueReply.model_validate_json(popped[1])
        self.last_reply = reply
        if reply.status >= 400 or reply.body is None:
            err = reply.error
            raise api_error(reply.status, err.error if err else "error", err.message if err else "no body")
        return RESPONSE_MODELS[type_].model_validate(reply.body)

    async def _resend_if_lost(self, request_id: str, deadline: float) -> None:
        """Send the message again (same request id) if Redis holds neither it nor its answer."""
        sent = self._sent.get(request_id)
        if sent is None:  # not sent by this client: nothing to re-send
            return
        entry, raw = sent
        # The stream first: a consumer writes the answer before it deletes the entry, so an entry
        # gone and no answer means lost (checked the other way round, an answer could slip between).
        if await self._redis.xrange(self.keys.stream(self.job_id), entry, entry, count=1):
            return
        if await self._redis.exists(self.keys.result(request_id), self.keys.reply(request_id)):
            return
        logger.warning("request %s was lost by Redis (no entry, no answer): sending it again", request_id)
        self._sent[request_id] = (await self._append(raw, request_id, deadline), raw)
        self.resent += 1

    async def _call(self, type_: str, request: BaseModel, out: type[T]) -> T:
        start = time.monotonic()
        rid = await self.send(type_, request)
        result = await self.receive(type_, rid, timeout=self.timeout - (time.monotonic() - start))
        assert isinstance(result, out)
        return result

    async def score(self, request: ScoreRequest | None = None, **fields) -> ScoreResponse:
        return await self._call("score", request or ScoreRequest(**fields), ScoreResponse)

    async def pairwise(self, request: PairwiseRequest | None = None, **fields) -> PairwiseResponse:
        return await self._call("pairwise", request or PairwiseRequest(**fields), PairwiseResponse)

    async def judge(self, request: JudgeRequest | None = None, **fields) -> JudgeResponse:
        return await self._call("judge", request or JudgeRequest(**fields), JudgeResponse)

    async def winrate(self, request: WinRateRequest | None = None, **fields) -> WinRateResponse:
        return await self._call("winrate", request or WinRateRequest(**fields), WinRateResponse)

    async def judges(self) -> JudgesResponse:
        """The judges the consumers announce (raises ``Unavailable`` if no consumer is running)."""
        try:
            raw = await self._redis.get(self.keys.judges)
        except RedisError as exc:
            raise QueueUnavailable(f"cannot read the judges from Redis: {exc}") from exc
        if raw is None:
            raise api_error(503, "unavailable", "no judge consumer has announced itself on this Redis prefix")
        return JudgesResponse.model_validate_json(raw)

    async def health(self) -> bool:
        """True when Redis answers and a consumer has announced its judges recently."""
        try:
            return bool(await self._redis.ping()) and bool(await self._redis.exists(self.keys.judges))
        except Exception:
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> QueueReferee:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
