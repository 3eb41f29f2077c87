"""``QueueReferee``: the methods of ``AsyncReferee``, carried by Redis Streams instead of HTTP.

A request is appended to its job's stream; any server replica's consumer judges it and writes the
answer to a per-request list that this client blocks on. Many training jobs can share one judge
this way: consumers take turns between the jobs' streams, a consumer that dies leaves its messages
to be reclaimed by another, and every request gets exactly one answer (or an error), never silence.

Tenants: with an API key (``api_key=`` or ``$REFEREE_API_KEY``) the client logs in to Redis as its
tenant's ACL user (user name: the tenant, password: the key; see ``referee.acl``) and uses that
tenant's key namespace only, which no other tenant can read or write. Without a key it is the open
tenant, ``anonymous``; against consumers that require keys it fails at once with a 401. Redis'
refusals (``WRONGPASS``, ``NOAUTH``, ``NOPERM``) are raised as 401 and 403 ``APIError``s, not
retried.

Faults: while Redis is unreachable (restarting, loading its append-only file) or full (out of
memory, until the consumers drain it) sends and waits are retried with jittered backoff until the
request's timeout, then ``QueueUnavailable`` is raised; no redis-py exception escapes. A message
that Redis lost (a restart that dropped its last writes) is noticed while waiting — neither in the
stream nor answered — and sent again with the same request id, which the consumers answer at most
once. Each message carries a deadline (now + ``timeout``): a consumer that reaches it later answers
``expired`` without judging it.

URLs: ``redis://``, ``rediss://`` and, for a Redis Cluster, ``redis+cluster://`` (``referee.connect``);
a tenant's keys share one cluster slot (``referee.keys``). Before its first send the client checks the
key layout the consumers publish and refuses consumers on another (409 ``key_layout``). Across a
failover the lost-message check below answers every call once (docs/queue.md, "Redis Cluster and
failover").

Size: a message over the consumers' ``max_message_bytes`` (published in Redis; the server's
``queue.max_message_bytes``) is refused before it is sent, with a 413 ``too_large`` ``BadRequest``.

Scripts: a message is appended by a Lua script (``referee.scripts.SEND``) run with ``EVALSHA`` and
the SHA1 computed here. Tenants may not load scripts (``referee.acl``): the consumers load it on
every connect. Until one has (no consumer has run on this Redis yet, or Redis restarted and none
has reconnected yet) Redis answers ``NOSCRIPT``: the open tenant tries ``SCRIPT LOAD`` once (its
user may be allowed to), otherwise it is retried like an unreachable Redis until the request's
deadline, then ``QueueUnavailable`` says that no judge consumer has loaded the queue's scripts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import random
import time
import uuid
from typing import Any, TypeVar

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .auth import ENV_KEY, OPEN_TENANT, key_from_env, tenant_of
from .client import APIError, BacklogFull, QueueUnavailable, RefereeTimeout, _build, api_error, redact
from .connection import connect
from .defaults import DEFAULT_REDIS_URL
from .health import DEFAULT_WINDOW_S as HEALTH_WINDOW_S
from .health import DEFAULT_WINDOWS as HEALTH_WINDOWS
from .health import HealthReport, Tally, build_report, parse_fields
from .images import image_bytes
from .keys import DEFAULT_PREFIX, KEY_LAYOUT, Keys, check_id
from .protocol import (
    RESPONSE_MODELS,
    ImagePart,
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
from .scripts import BLOB, BLOB_SHA, DEFAULT_MAX_MESSAGE_BYTES, SEND, SEND_SHA

T = TypeVar("T", bound=BaseModel)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 10_000  # the server's QueueSettings.max_backlog default
_ALWAYS_SMALL_ENOUGH = 64 << 10  # the least QueueSettings.max_message_bytes may be: no need to check
_POLL_S = 2.0
_MAX_CONNECTIONS = 10_000  # Redis' own default maxclients


def redis_url() -> str:
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


def _transient(exc: RedisError) -> bool:
    """Errors that end by themselves: no connection, a timeout, a Redis still loading its data
    (a ``ConnectionError``), or one out of memory until consumers drain it. A refused login is a
    ``ConnectionError`` too, but permanent."""
    if _refusal(exc) is not None:
        return False
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OutOfMemoryError)) or (
        isinstance(exc, ResponseError) and "used memory > 'maxmemory'" in str(exc)  # inside a script
    )


def _refusal(exc: BaseException) -> tuple[int, str] | None:
    """(401, what) for a refused login (wrong key, unknown or disabled user, no login where one is
    required); (403, what) for a command or key the ACL user may not use; else None."""
    if isinstance(exc, AuthenticationError):
        return 401, str(exc)
    text = str(exc)
    if isinstance(exc, NoPermissionError) or (
        isinstance(exc, ResponseError)
        and ("NOPERM" in text or "can't access" in text or "no permissions" in text)
    ):
        return 403, text
    return None


class _Retry(Retry):
    """redis-py's retry of a broken connection, less refused logins (``AuthenticationError`` is a
    ``ConnectionError``): a wrong key is not worth four attempts."""

    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(exc: Exception) -> bool:
            return not isinstance(exc, AuthenticationError) and (is_retryable is None or is_retryable(exc))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def _backoff(failures: int, cap: float = 2.0) -> float:
    delay = min(cap, 0.05 * 2**failures)
    return delay / 2 + random.uniform(0, delay / 2)


class QueueReferee:
    """Async judge client over Redis. ``async with QueueReferee(job_id="run-1") as ref: ...``

    ``timeout`` bounds each call: sending (with retries while Redis is down) and waiting for the
    answer; it also sets the message's deadline. ``max_backlog`` caps the job's stream when no
    consumer has published the server's cap (the server's value wins: the operator sizes Redis).
    ``lost_check_s`` is how often a waiting call checks that its message still exists.

    ``api_key`` (default ``$REFEREE_API_KEY``) logs in to Redis as the key's tenant (``tenant``, or
    the one named in an ``rk.<tenant>.<secret>`` key), on top of ``url``; without one the client
    is the open tenant (or ``tenant``, when the URL carries that tenant's login).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        job_id: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 600.0,
        redis: Redis | RedisCluster | None = None,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        lost_check_s: float = 10.0,
        api_key: str | None = None,
        tenant: str | None = None,
    ) -> None:
        api_key = key_from_env(api_key)
        if api_key is not None:
            tenant = tenant or tenant_of(api_key)
            if tenant is None:
                raise ValueError(
                    "cannot tell this API key's tenant: it is not an 'rk.<tenant>.<secret>' key; "
                    "pass tenant= as well"
                )
        self.tenant = tenant or OPEN_TENANT
        self.open = api_key is None and self.tenant == OPEN_TENANT  # no login: the open tenant
        self._secret = api_key  # kept out of every message
        self.keys = Keys(prefix, self.tenant)
        self.job_id = check_id(job_id, "job_id")
        self.keys.stream(job_id)
        self.timeout = timeout
        self.max_backlog = max_backlog
        self.lost_check_s = lost_check_s
        login = {"username": self.tenant, "password": api_key} if api_key is not None else {}
        self._redis = redis or connect(
            url or redis_url(),
            decode_responses=True,
            socket_timeout=_POLL_S + 5,
            socket_connect_timeout=5,
            retry=_Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),  # stale connections
            # Every call waiting for its answer holds a connection (BLPOP): redis-py 8 caps a pool at
            # 100 by default, and the 101st concurrent call failed with "Too many connections".
            max_connections=_MAX_CONNECTIONS,
            **login,  # the key wins over a login in the URL
        )
        self._layout_checked = False  # the consumers' key layout, checked before the first send
        # Only the open tenant's user may be allowed SCRIPT LOAD; a tenant's never is (referee.acl).
        self._may_load: bool = self.open
        self._sent: dict[str, tuple[str, str]] = {}  # request id -> (entry id, message JSON), unanswered
        self._max_message_bytes: int | None = None  # the consumers' published limit, read when needed
        self.last_reply: QueueReply | None = None
        self.resent = 0  # messages sent again after Redis lost them
        self.recovered = 0  # answers read back from their result key after a popped reply was lost

    def _refused(self, exc: RedisError, doing: str) -> APIError | None:
        """The SDK's 401 or 403 for a Redis refusal, else None."""
        refusal = _refusal(exc)
        if refusal is None:
            return None
        status, what = refusal[0], redact(refusal[1], self._secret)
        if status == 401:
            who = "without a login" if self.open else f"as user {self.tenant!r}"
            return api_error(
                401,
                "unauthorized",
                f"Redis refused {doing} {who} ({what}): check the API key (api_key= or ${ENV_KEY}) and "
                "that the tenant's Redis user exists (`referee redis-acl`)",
            )
        return api_error(
            403,
            "forbidden",
            f"Redis does not let tenant {self.tenant!r} do this ({doing}): {what}. A tenant may only "
            f"use its own keys ({self.keys.pattern}); check the prefix and the tenant's Redis user",
        )

    async def send(
        self, type_: str, request: BaseModel, request_id: str | None = None, *, deadline: float | None = None
    ) -> str:
        """Append a request to this job's stream; returns its request id (the idempotency key).

        ``deadline`` (epoch seconds, default now + ``timeout``) also bounds the retries while Redis
        is unreachable. Raises ``BacklogFull`` when the job's stream, or the tenant's streams
        together, are at their cap."""
        now = time.time()
        if request_id is not None:
            check_id(request_id, "request_id")
        body = request.model_dump(mode="json", exclude_none=True, exclude_unset=True)
        body = await self._blobs_for_inline(body)  # stream entries carry references, not pixels
        msg = QueueMessage(
            type=type_,
            job_id=self.job_id,
            request_id=request_id or uuid.uuid4().hex,
            sent_at=now,
            deadline=now + self.timeout if deadline is None else deadline,
            body=body,
        )
        raw = msg.model_dump_json()
        await self._check_size(raw, msg.request_id)
        entry = await self._append(raw, msg.request_id, msg.deadline)
        self._sent[msg.request_id] = (entry, raw)
        return msg.request_id

    async def _check_size(self, raw: str, request_id: str) -> None:
        """Refuse a message over the consumers' ``max_message_bytes`` before sending it (the send
        script refuses it too: the limit is theirs, read from Redis once and again before refusing,
        in case it was raised)."""
        size = len(raw.encode())
        if size <= _ALWAYS_SMALL_ENOUGH:
            return
        if self._max_message_bytes is None or size > self._max_message_bytes:  # (again: raised since?)
            try:
                published = await self._redis.hget(self.keys.limits, "max_message_bytes")
            except RedisError:  # down, or refused: the send says so, and checks the size itself
                return
            self._max_message_bytes = int(published) if published else DEFAULT_MAX_MESSAGE_BYTES
        if size > self._max_message_bytes:
            raise self._too_large(request_id, size, self._max_message_bytes)

    def _too_large(self, request_id: str, size: int, cap: int) -> APIError:
        return api_error(
            413,
            "too_large",
            f"request {request_id} is {size} bytes as a queued message, over the judges' limit of {cap} "
            "(queue.max_message_bytes); it was not sent. Send fewer items per request (images go as "
            "uploads: QueueReferee uploads inline images itself)",
        )

    async def upload(self, source: Any) -> ImagePart:
        """Keep an image in Redis for this tenant (its namespace, the consumers' TTL and limits);
        the returned part references it in any request of this tenant, queued or over HTTP to a
        server on the same queue."""
        raw = image_bytes(source)
        digest = hashlib.sha256(raw).hexdigest()
        keys = [self.keys.blob(digest), self.keys.blob_bytes]
        deadline, failures, loaded = time.time() + self.timeout, 0, False
        while True:
            try:
                code, *rest = await self._redis.evalsha(
                    BLOB_SHA, len(keys), *keys, raw, self.keys.tenant_limits
                )
                break
            except RedisError as exc:
                if (refused := self._refused(exc, "uploading an image")) is not None:
                    raise refused from exc
                no_script = isinstance(exc, NoScriptError)
                if no_script and not loaded and self._may_load:
                    with contextlib.suppress(RedisError):
                        loaded = await self._redis.script_load(BLOB) is not None
                    continue
                failures += 1
                delay = _backoff(failures)
                if not (no_script or _transient(exc)) or time.time() + delay >= deadline:
                    raise QueueUnavailable(
                        redact(f"cannot upload an image through Redis: {exc}", self._secret)
                    ) from exc
                await asyncio.sleep(delay)
        code = int(code)
        if code == 4:
            raise QueueUnavailable("no judge consumer has published the upload limits on this Redis prefix")
        if code in (2, 3):
            what = "max_image_bytes" if code == 2 else "tenant_blob_bytes"
            raise api_error(
                413,
                "too_large",
                f"the upload would need {rest[0]} bytes, over the consumers' limit of {rest[1]} "
                f"(media.{what}); send smaller images or reference those already uploaded",
            )
        return ImagePart(blob="sha256:" + digest)

    async def _blobs_for_inline(self, value: Any) -> Any:
        """The body with every inline image uploaded once and replaced by its reference."""
        if isinstance(value, list):
            return [await self._blobs_for_inline(v) for v in value]
        if not isinstance(value, dict):
            return value
        if value.get("type") == "image" and value.get("data") is not None:
            part = await self.upload(base64.b64decode(value["data"]))
            return part.model_dump(exclude_none=True)
        if value.get("type") == "image_url" and str(value.get("image_url", {}).get("url", "")).startswith(
            "data:"
        ):
            payload = value["image_url"]["url"].partition(",")[2]
            part = await self.upload(base64.b64decode(payload))
            return part.model_dump(exclude_none=True)
        return {k: await self._blobs_for_inline(v) for k, v in value.items()}

    async def _load_scripts(self) -> bool:
        """Load the send script as this client's user, if it may (the open tenant's user may be
        allowed to; once refused, never tried again). True when loaded."""
        if not self._may_load:
            return False
        try:
            loaded = await self._redis.script_load(SEND)
        except RedisError as exc:
            if _refusal(exc) is not None:  # NOPERM: not this user's to do; wait for a consumer
                self._may_load = False
                logger.info("this Redis user may not load scripts (%s): waiting for a consumer", exc)
            return False  # a connection error: the send loop retries
        return (loaded.decode() if isinstance(loaded, bytes) else loaded) == SEND_SHA

    async def _check_layout(self) -> None:
        """Before the first send: refuse consumers that serve no tenants when this client has a key
        (``auth`` 0: they would never read its streams), and consumers that name their keys otherwise
        (``key_layout`` in the shared limits; consumers from before layout 2 publish none). Nothing
        published (no consumer yet): nothing to compare, checked again at the next send. A Redis
        error other than a refusal leaves the check to the next try: the send meets it too."""
        try:
            auth = await self._redis.hget(self.keys.limits, "auth")
            layout = await self._redis.hget(self.keys.limits, "key_layout")
        except RedisError as exc:
            if _refusal(exc) is not None:
                raise
            return
        if auth is None and layout is None:
            return
        if not self.open and auth == "0":
            raise api_error(
                401,
                "unauthorized",
                f"the judges on this Redis prefix run without tenants and would never read tenant "
                f"{self.tenant!r}'s streams: drop the API key (api_key=, ${ENV_KEY}) for this server",
            )
        if layout != str(KEY_LAYOUT):
            raise self._other_layout(layout)
        self._layout_checked = True

    def _other_layout(self, layout: str | None) -> APIError:
        return api_error(
            409,
            "key_layout",
            f"the judges on this Redis prefix ({self.keys.prefix!r}) name their keys with key layout "
            f"{layout or 1}, this client with layout {KEY_LAYOUT}: its messages would never be read. "
            "Use the referee version the server runs, or upgrade the server (docs/queue.md, "
            "'Upgrading the key layout')",
        )

    async def _append(self, raw: str, request_id: str, deadline: float) -> str:
        failures, loaded = 0, False
        keys = [self.keys.stream(self.job_id), self.keys.jobs]
        while True:
            try:
                if not self._layout_checked:
                    await self._check_layout()
                added = await self._redis.evalsha(
                    SEND_SHA,
                    len(keys),
                    *keys,
                    raw,
                    self.max_backlog,
                    self.job_id,
                    time.time(),
                    self.tenant,
                    1 if self.open else 0,
                    self.keys.streams_prefix,
                    self.keys.tenant_limits,  # in the tenant's slot, as a script on a cluster needs
                    KEY_LAYOUT,
                )
                break
            except RedisError as exc:
                if (refused := self._refused(exc, f"sending request {request_id}")) is not None:
                    raise refused from exc
                no_script = isinstance(exc, NoScriptError)
                if no_script and not loaded and await self._load_scripts():
                    loaded = True  # loaded it ourselves: send again at once (once)
                    continue
                failures += 1
                delay = _backoff(failures)
                if not (no_script or _transient(exc)) or time.time() + delay >= deadline:
                    if no_script:
                        raise QueueUnavailable(
                            f"cannot send request {request_id}: no judge consumer has loaded the "
                            "queue's scripts on this Redis (NOSCRIPT; is the server running with the "
                            "queue enabled?)"
                        ) from exc
                    raise QueueUnavailable(
                        redact(f"cannot send request {request_id} through Redis: {exc}", self._secret)
                    ) from exc
                logger.warning("sending %s: Redis error (%s), retrying in %.2fs", request_id, exc, delay)
                await asyncio.sleep(delay)
        outcome = int(added[0])
        if outcome == 7:
            self._layout_checked = False
            raise self._other_layout(added[1])
        if outcome == 2:
            raise api_error(
                401,
                "unauthorized",
                "the judges on this Redis prefix require an API key: pass api_key= to QueueReferee "
                f"or set {ENV_KEY} (an operator makes one with `referee keys new TENANT`)",
            )
        if outcome == 4:
            raise api_error(
                401,
                "unauthorized",
                f"the judges on this Redis prefix run without tenants and would never read tenant "
                f"{self.tenant!r}'s streams: drop the API key (api_key=, ${ENV_KEY}) for this server",
            )
        if outcome == 6:
            self._max_message_bytes = int(added[2])
            raise self._too_large(request_id, int(added[1]), int(added[2]))
        if outcome == 0:
            raise BacklogFull(
                429,
                "backlog_full",
                f"job {self.job_id}'s stream holds {added[1]} messages, at its cap of {added[2]} "
                "(the server's queue.max_backlog): wait for answers before sending more",
            )
        if outcome == 5:
            raise BacklogFull(
                429,
                "backlog_full",
                f"tenant {self.tenant} has {added[1]} active jobs, at the server's cap of {added[2]} "
                "(queue.max_jobs_per_tenant): reuse a job id, or wait until idle jobs are forgotten "
                "(queue.jobs_ttl_s)",
            )
        if outcome == 3:
            raise BacklogFull(
                429,
                "backlog_full",
                f"tenant {self.tenant}'s job streams hold {added[1]} messages together, at its cap of "
                f"{added[2]} (the tenant's max_queued): wait for answers before sending more",
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
                        [self.keys.reply(self.job_id, request_id)], timeout=min(remaining, _POLL_S)
                    )
                    if popped is not None:
                        break
                    if time.monotonic() >= next_check:
                        if (popped := await self._answer_kept(request_id)) is not None:
                            break
                        await self._resend_if_lost(request_id, time.time() + remaining)
                        next_check = time.monotonic() + self.lost_check_s
                    failures, error = 0, None
                except RedisError as exc:
                    if (refused := self._refused(exc, f"waiting for request {request_id}")) is not None:
                        raise refused from exc
                    if not _transient(exc):
                        raise QueueUnavailable(f"waiting for request {request_id}: {exc}") from exc
                    failures, error = failures + 1, exc
                    await asyncio.sleep(min(_backoff(failures), max(0.0, deadline - time.monotonic())))
                    # Redis came back after an outage, or a read was cut off (its popped reply may be
                    # lost on the way): check at once for the answer and the message.
                    next_check = time.monotonic()
        finally:
            self._sent.pop(request_id, None)
        reply = QueueReply.model_validate_json(popped[1])
        self.last_reply = reply
        if reply.status >= 400 or reply.body is None:
            err = reply.error
            raise api_error(reply.status, err.error if err else "error", err.message if err else "no body")
        return RESPONSE_MODELS[type_].model_validate(reply.body)

    async def _answer_kept(self, request_id: str) -> tuple[str, str] | None:
        """The answer from the request's result key, when its reply list is gone though answered.

        Redis pops a reply as soon as it answers a BLPOP; if the read of that answer is cut off
        (a socket timeout after the event loop stalled, a dropped connection), the reply is gone
        from the list but never reached this client. The consumer keeps the answer in the result
        key too (``reward_server.consumer``), for as long as the reply would have been kept."""
        result_key, reply_key = (
            self.keys.result(self.job_id, request_id),
            self.keys.reply(self.job_id, request_id),
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(reply_key)
            pipe.get(result_key)
            waiting, kept = await pipe.execute()
        if waiting or kept is None or not kept.startswith("{"):  # the list still holds it / a marker
            return None
        logger.warning(
            "the answer to request %s was popped but not received: read from its result key", request_id
        )
        self.recovered += 1
        return result_key, kept

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
        if await self._redis.exists(
            self.keys.result(self.job_id, request_id), self.keys.reply(self.job_id, request_id)
        ):
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
        return await self._call("score", _build(ScoreRequest, request, fields), ScoreResponse)

    async def pairwise(self, request: PairwiseRequest | None = None, **fields) -> PairwiseResponse:
        return await self._call("pairwise", _build(PairwiseRequest, request, fields), PairwiseResponse)

    async def judge(self, request: JudgeRequest | None = None, **fields) -> JudgeResponse:
        return await self._call("judge", _build(JudgeRequest, request, fields), JudgeResponse)

    async def winrate(self, request: WinRateRequest | None = None, **fields) -> WinRateResponse:
        return await self._call("winrate", _build(WinRateRequest, request, fields), WinRateResponse)

    async def step_rewards(self, prompt, response, *, judge: str | None = None, aggregate: str | None = None):
        """``Referee.step_rewards`` through the queue: a ``/score`` message, its answer a ``StepReward``."""
        from .steps import step_request, step_reward

        return step_reward(await self.score(step_request(prompt, response, judge=judge, aggregate=aggregate)))

    async def judges(self) -> JudgesResponse:
        """The judges the consumers announce (raises ``Unavailable`` if no consumer is running)."""
        try:
            raw = await self._redis.get(self.keys.judges)
        except RedisError as exc:
            if (refused := self._refused(exc, "reading the judges")) is not None:
                raise refused from exc
            raise QueueUnavailable(f"cannot read the judges from Redis: {exc}") from exc
        if raw is None:
            raise api_error(503, "unavailable", "no judge consumer has announced itself on this Redis prefix")
        return JudgesResponse.model_validate_json(raw)

    async def report(
        self,
        job: str | None = None,
        *,
        judge: str | None = None,
        all_jobs: bool = False,
        max_jobs: int = 1000,
    ) -> HealthReport:
        """What the judge gave a job (default: this client's), read from Redis where every replica
        adds its counts (``referee.health``; at most the servers' ``health.flush_every_s`` old):
        figures per judge and window, and warnings when the reward looks empty or biased.
        ``all_jobs``: the tenant's ``max_jobs`` most recent jobs together."""
        try:
            limits = [
                await self._redis.hget(self.keys.limits, f) for f in ("health_window_s", "health_windows")
            ]
            window_s = float(limits[0]) if limits[0] else HEALTH_WINDOW_S
            keep = int(limits[1]) if limits[1] else HEALTH_WINDOWS
            if all_jobs:
                jobs = await self._redis.zrevrange(self.keys.health_jobs, 0, max_jobs - 1)
            else:
                jobs = [check_id(job or self.job_id, "job")]
            windows: dict = {}
            for name in jobs:
                for start, judges in parse_fields(await self._redis.hgetall(self.keys.health(name))).items():
                    for j, tally in judges.items():
                        windows.setdefault(start, {}).setdefault(j, Tally()).update(tally)
        except RedisError as exc:
            if (refused := self._refused(exc, "reading the job's health report")) is not None:
                raise refused from exc
            raise QueueUnavailable(f"cannot read the health report from Redis: {exc}") from exc
        if judge is not None:
            windows = {
                s: {k: t for k, t in ts.items() if k.split("/")[0] == judge} for s, ts in windows.items()
            }
        return build_report(
            windows,
            tenant=self.tenant,
            job=None if all_jobs else (job or self.job_id),
            window_s=window_s,
            keep=keep,
        )

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
