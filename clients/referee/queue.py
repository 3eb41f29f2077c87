"""``QueueReferee``: the methods of ``AsyncReferee``, carried by Redis Streams instead of HTTP.

A request is appended to its job's stream; any server replica's consumer judges it and writes the
answer to a per-request list that this client blocks on. Many training jobs can share one judge
this way: consumers take turns between the jobs' streams, a consumer that dies leaves its messages
to be reclaimed by another, and every request gets exactly one answer (or an error), never silence.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TypeVar

from pydantic import BaseModel
from redis.asyncio import Redis

from .client import RefereeTimeout, api_error
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

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_POLL_S = 2.0


def redis_url() -> str:
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


class QueueReferee:
    """Async judge client over Redis. ``async with QueueReferee(job_id="run-1") as ref: ...``"""

    def __init__(
        self,
        url: str | None = None,
        *,
        job_id: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 600.0,
        redis: Redis | None = None,
    ) -> None:
        self.keys = Keys(prefix)
        self.job_id = job_id
        self.timeout = timeout
        self._redis = redis or Redis.from_url(url or redis_url(), decode_responses=True)
        self.last_reply: QueueReply | None = None

    async def send(self, type_: str, request: BaseModel, request_id: str | None = None) -> str:
        """Append a request to this job's stream; returns its request id (the idempotency key)."""
        msg = QueueMessage(
            type=type_,
            job_id=self.job_id,
            request_id=request_id or uuid.uuid4().hex,
            sent_at=time.time(),
            body=request.model_dump(mode="json", exclude_none=True),
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.stream(self.job_id), {"msg": msg.model_dump_json()})
            pipe.zadd(self.keys.jobs, {self.job_id: time.time()})
            await pipe.execute()
        return msg.request_id

    async def receive(self, type_: str, request_id: str, timeout: float | None = None) -> BaseModel:
        """Wait for the answer to ``request_id``; raise the SDK's exception for an error answer."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        popped = None
        while popped is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RefereeTimeout(f"no answer to {type_} request {request_id} within {timeout:.0f}s")
            # Short blocking pops: redis-py's socket timeout (5 s by default) bounds one blocking read.
            popped = await self._redis.blpop([self.keys.reply(request_id)], timeout=min(remaining, _POLL_S))
        reply = QueueReply.model_validate_json(popped[1])
        self.last_reply = reply
        if reply.status >= 400 or reply.body is None:
            err = reply.error
            raise api_error(reply.status, err.error if err else "error", err.message if err else "no body")
        return RESPONSE_MODELS[type_].model_validate(reply.body)

    async def _call(self, type_: str, request: BaseModel, out: type[T]) -> T:
        rid = await self.send(type_, request)
        result = await self.receive(type_, rid)
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
        raw = await self._redis.get(self.keys.judges)
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
