"""The Redis queue consumer that runs inside every server replica.

It reads trainers' requests from the per-job streams through one consumer group and hands them to
the same ``JudgeService`` as the HTTP routes, so queued and HTTP questions meet in the same vLLM
batches. Its guarantees:

- tenants: it serves the tenants of the server's settings (``tenants``), or the open tenant
  (``anonymous``) when none is configured, each in its own key namespace; a message's tenant and
  job are those of the stream it was read from, never what the message says: a message naming
  another job is answered 403 ``wrong_job`` unjudged, and every answer is written under the
  stream's tenant and job, so a tenant reusing another's request id only ever answers itself;
- fair sharing: each read takes at most ``read_count`` messages from every job's stream and a job
  has at most ``per_job_inflight_messages`` messages in this consumer at once; the service then admits
  queued questions in fair-share order (tenants by weight, then jobs), waiting instead of refusing,
  so a job or tenant that floods the queue cannot starve a small one;
- nothing lost: a message is acknowledged only after its answer is written; the messages of a
  consumer that dies stay pending and are reclaimed (``XAUTOCLAIM``) after ``reclaim_idle_s``,
  while a live consumer refreshes the idle time of the messages it is still judging;
- nothing answered twice: the answer is written by a script that sets the request's result key
  only if it is absent, so a reclaimed message that was already answered is just acknowledged;
- nothing waits forever: a request that fails ``max_deliveries`` times, or cannot be read, goes to
  the dead-letter stream with its error, and its sender gets an error answer; a message past its
  ``deadline`` gets an ``expired`` answer (status 504) without being judged;
- faults: ``run()`` reconnects with jittered backoff after any Redis error and recreates the
  consumer groups, and reports its ``state`` (``/readyz``); answers are written through short
  outages rather than judged again;
- senders' scripts: tenants may not load scripts (``referee.acl``), only run cached ones by SHA1,
  so the consumer loads ``referee.scripts.TENANT_SCRIPTS`` on every (re)connect, before it reports
  ``consuming``, and checks every second that Redis still has them (a restart that redis-py rode
  out without an error, a ``SCRIPT FLUSH``), loading them again if not;
- bounded: dead-letter entries (one stream per tenant: they hold payloads) are cut and the stream
  capped; idle jobs and dead group members are removed; the per-job backlog cap (``max_backlog``),
  each tenant's cap on its waiting messages (``max_queued:<tenant>``) and whether keys are required
  (``auth``) are published for senders, which enforce them;
- graceful stop: reading stops at once, messages being judged get ``shutdown_grace_s`` and the rest
  are handed back to the group without costing a delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import time
from collections import defaultdict
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from referee.auth import OPEN_TENANT
from referee.keys import CONSUMER_GROUP, Keys, valid_id
from referee.protocol import REQUEST_MODELS, SCHEMA_VERSION, ErrorResponse, QueueMessage, QueueReply
from referee.scripts import TENANT_SCRIPTS

from . import metrics
from .errors import ClientError
from .fairness import DEADLINE
from .media import blob_limits
from .service import JudgeService
from .settings import QueueSettings

logger = logging.getLogger(__name__)

# Set the result marker and push the answer only if no answer was written before.
_REPLY_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# Forget a job silent since before ARGV[2] whose stream is empty (a send in between renews it).
_DROP_IDLE_JOB = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) and redis.call('XLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

_RETRYABLE = {429, 503}  # overloaded (while stopping) or unavailable: leave it pending, try later
WRONG_JOB_STATUS = 403  # a message naming another job than its stream's: not judged
EXPIRED_STATUS = 504  # an expired message's reply: the judge did not get to it before its deadline
HAND_BACK_IDLE_MS = 10**9  # idle time given to handed-back messages: any consumer reclaims them at once
_REQUEST_ID = re.compile(r'"request_id"\s*:\s*"([^"]{1,128})"')


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a message was read: its tenant's keys, its job and its stream entry."""

    keys: Keys
    job: str
    stream: str
    entry_id: str


class QueueConsumer:
    """Judges queued messages until ``stop()``; ``run()`` survives any Redis error.

    ``state`` is ``starting`` (judges loading), ``consuming``, ``reconnecting`` (after a Redis error,
    retried with jittered backoff; ``last_error`` says which), ``draining`` (stopping) or ``stopped``.
    Jobs are identified by their stream's name, which holds the tenant and the job id.
    """

    def __init__(self, service: JudgeService, settings: QueueSettings, redis: Redis | None = None) -> None:
        self.service = service
        self.settings = settings
        self.keys = Keys(settings.prefix)  # the shared keys (limits, judges); the open tenant's
        configured = list(getattr(getattr(service, "settings", None), "tenants", None) or [])
        self.auth = bool(configured)  # keys required: senders without one are refused
        self.tenant_settings = {t.name: t for t in configured}
        self.tenants = [t.name for t in configured] or [OPEN_TENANT]
        self.tenant_keys = {t: Keys(settings.prefix, t) for t in self.tenants}
        self.name = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.redis = redis or Redis.from_url(
            settings.url,
            decode_responses=True,
            socket_timeout=settings.socket_timeout_s + settings.block_ms / 1000,
            socket_connect_timeout=settings.socket_timeout_s,
            # A connection broken by a Redis restart is retried on a fresh one (redis-py's URL
            # clients retry nothing by default); a Redis that stays down raises to run().
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
        )
        self._reply_once = self.redis.register_script(_REPLY_ONCE)
        self._drop_idle_job = self.redis.register_script(_DROP_IDLE_JOB)
        self._may_check_scripts = True  # SCRIPT EXISTS allowed (else SCRIPT LOAD every check)
        self._streams: dict[str, tuple[str, str]] = {}  # active job stream -> (tenant, job)
        self._grouped: set[str] = set()  # streams whose consumer group exists
        self._ignored: set[tuple[str, str]] = set()  # (tenant, job id) refused as key names, logged once
        self._inflight: dict[str, dict[str, int]] = defaultdict(dict)  # stream -> entry id -> deliveries
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task | None = None
        self.state = "starting"
        self.since = time.time()
        self.last_error: str | None = None
        self.reconnects = 0
        self.backlog: int | None = None  # messages not yet delivered, all job streams together

    # ------------------------------------------------------------ state

    def _set_state(self, state: str, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state == self.state and error is None:
            return
        log = logger.warning if state in ("reconnecting", "stopped") and error else logger.info
        log("queue consumer %s: %s -> %s%s", self.name, self.state, state, f" ({error})" if error else "")
        self.state, self.since = state, time.time()
        metrics.QUEUE_CONSUMING.set(1 if state == "consuming" else 0)

    def status(self) -> dict:
        """The state ``/readyz`` reports."""
        return {
            "state": self.state,
            "since": round(self.since, 3),
            "last_error": self.last_error,
            "reconnects": self.reconnects,
            "inflight": self._total_inflight(),
            "backlog": self.backlog,
            "consumer": self.name,
        }

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Consume until ``stop()``. Any error of Redis (or of this loop) sends it back to
        ``reconnecting``: it waits a jittered, growing delay, reconnects, recreates the consumer
        groups (a restarted Redis may have lost them) and goes on; messages being judged carry on."""
        self._loop = asyncio.get_running_loop()
        self._runner = asyncio.current_task()
        self._set_state("starting")
        while not self.service.ready:
            if self.service.load_error:
                self._set_state("stopped", f"the judges failed to load: {self.service.load_error}")
                return
            if self._stopping.is_set():
                return
            await asyncio.sleep(0.5)
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._connect()
                failures = 0
                self._set_state("consuming")
                await self._consume()
            except Exception as exc:
                if self._stopping.is_set():
                    break
                failures += 1
                self.reconnects += 1
                self._grouped.clear()
                if not isinstance(exc, RedisError):  # a bug rather than a fault: keep its traceback
                    logger.exception("queue consumer %s failed", self.name)
                self._set_state("reconnecting", f"{type(exc).__name__}: {exc}")
                delay = min(self.settings.reconnect_max_s, 0.1 * 2**failures)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay / 2 + random.uniform(0, delay / 2))

    async def _connect(self) -> None:
        await self.redis.ping()
        await self._load_scripts()  # Redis may have restarted without them: tenants cannot load them
        self._grouped.clear()  # recreate every group: Redis may have restarted without them
        await self._refresh_jobs()

    async def _load_scripts(self) -> None:
        """Load the scripts senders run by EVALSHA (``TENANT_SCRIPTS``): tenants' Redis users may
        not load scripts (a tenant able to would be able to block Redis with a busy loop)."""
        for sha, source in TENANT_SCRIPTS.items():
            loaded = await self.redis.script_load(source)
            if isinstance(loaded, bytes):
                loaded = loaded.decode()
            if loaded != sha:  # never: both sides hash the same source
                raise RuntimeError(f"Redis named a senders' script {loaded}, senders call it {sha}")

    async def _check_scripts(self) -> None:
        """Load the senders' scripts again if Redis lost them without this consumer noticing a
        reconnect (a restart redis-py's retry rode out, a ``SCRIPT FLUSH``). A server user of an
        older ACL file may lack ``SCRIPT EXISTS``: then they are loaded every time (cheap)."""
        if self._may_check_scripts:
            try:
                if all(await self.redis.script_exists(*TENANT_SCRIPTS)):
                    return
                logger.warning("Redis lost the senders' scripts (restarted or flushed): loading them again")
            except NoPermissionError as exc:
                self._may_check_scripts = False
                logger.warning(
                    "the server's Redis user may not run SCRIPT EXISTS (%s): loading the senders' "
                    "scripts every second instead; regenerate the ACL file (`referee redis-acl`)",
                    exc,
                )
        await self._load_scripts()

    async def _consume(self) -> None:
        s = self.settings
        last_jobs = last_reclaim = last_announce = last_cleanup = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now - last_announce > 20:
                await self._announce()
                last_announce = now
            if now - last_jobs > 1.0:
                await self._check_scripts()
                await self._refresh_jobs()
                last_jobs = now
            if now - last_reclaim > s.reclaim_every_s:
                await self._heartbeat()
                await self._reclaim()
                await self._measure_backlog()
                last_reclaim = now
            if now - last_cleanup > s.cleanup_every_s:
                await self._cleanup()
                last_cleanup = now
            await self._read()

    def stop_reading(self) -> None:
        """Stop taking new messages at once; ``stop()`` then drains (safe from a signal handler)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._begin_stop)
        else:
            self._begin_stop()

    def _begin_stop(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            self._set_state("draining")

    async def stop(self, drain_s: float | None = None) -> None:
        """Stop reading at once; let messages being judged finish within ``drain_s`` (default
        ``shutdown_grace_s``); cancel the rest and hand them back to the group without costing them
        a delivery, so that another consumer reclaims them at once."""
        grace = self.settings.shutdown_grace_s if drain_s is None else drain_s
        self._begin_stop()
        started = time.monotonic()
        if self._runner is not None and self._runner is not asyncio.current_task():
            await asyncio.wait({self._runner}, timeout=self.settings.socket_timeout_s)  # ends its read
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, grace - (time.monotonic() - started)))
        unfinished = {stream: dict(ids) for stream, ids in self._inflight.items() if ids}
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        try:
            for stream, entries in unfinished.items():
                await self._hand_back(stream, entries)
        except RedisError as exc:  # they stay pending and are reclaimed after reclaim_idle_s
            logger.warning("could not hand back %s: %s", unfinished, exc)
        self._set_state("stopped")
        await self.redis.aclose()

    async def _hand_back(self, stream: str, entries: dict[str, int]) -> None:
        """Give pending messages back without using up a delivery: their delivery count goes back to
        what it was before we took them, and a large idle time makes them reclaimable at once."""
        by_count: dict[int, list[str]] = defaultdict(list)
        for entry_id, deliveries in entries.items():
            by_count[max(0, deliveries - 1)].append(entry_id)
        for count, ids in by_count.items():
            await self.redis.xclaim(
                stream,
                CONSUMER_GROUP,
                self.name,
                0,
                ids,
                idle=HAND_BACK_IDLE_MS,
                retrycount=count,
                justid=True,
            )
        logger.info("handed back %d unfinished message(s) of %s", len(entries), stream)

    def _total_inflight(self) -> int:
        return sum(len(ids) for ids in self._inflight.values())

    async def _read(self) -> None:
        s = self.settings
        # Each stream read may give read_count messages: read only as many streams as the per-tenant
        # and total caps leave room for, so a tenant with many jobs cannot take the whole consumer.
        room = {tenant: s.per_tenant_inflight_messages for tenant, _ in self._streams.values()}
        for stream, ids in self._inflight.items():
            if ids and stream in self._streams:
                room[self._streams[stream][0]] -= len(ids)
        total_room = s.max_inflight_messages - self._total_inflight()
        eligible = []
        order = list(self._streams.items())
        self._turn = (getattr(self, "_turn", 0) + 1) % max(1, len(order))
        for stream, (tenant, _) in order[self._turn :] + order[: self._turn]:  # take turns first
            if (
                len(self._inflight[stream]) < s.per_job_inflight_messages
                and room[tenant] > 0
                and total_room > 0
            ):
                eligible.append(stream)
                room[tenant] -= s.read_count
                total_room -= s.read_count
        if not eligible or self._total_inflight() >= s.max_inflight_messages:
            if self._tasks:
                await asyncio.wait(
                    self._tasks, timeout=s.block_ms / 1000, return_when=asyncio.FIRST_COMPLETED
                )
            else:
                await asyncio.sleep(s.block_ms / 1000)
            return
        streams = dict.fromkeys(eligible, ">")
        try:
            batches = await self.redis.xreadgroup(
                CONSUMER_GROUP, self.name, streams, count=s.read_count, block=s.block_ms
            )
        except ResponseError as exc:  # a stream or group removed under us: rediscover
            if "NOGROUP" not in str(exc):
                raise
            self._grouped.clear()
            await self._refresh_jobs()
            return
        for stream, entries in batches or []:
            if self._stopping.is_set() or stream not in self._streams:
                # read while stop() began (or a job forgotten meanwhile): not ours to judge
                await self._hand_back(stream, {entry_id: 1 for entry_id, _ in entries})
                continue
            tenant, job = self._streams[stream]
            for entry_id, fields in entries:
                self._start(tenant, job, stream, entry_id, fields, deliveries=1)

    def _start(
        self, tenant: str, job: str, stream: str, entry_id: str, fields: dict | None, deliveries: int
    ) -> None:
        if entry_id in self._inflight[stream]:
            return
        self._inflight[stream][entry_id] = deliveries
        metrics.QUEUE_INFLIGHT.set(self._total_inflight())
        task = asyncio.create_task(self._handle(tenant, job, stream, entry_id, fields, deliveries))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._inflight[stream].pop(entry_id, None)
            metrics.QUEUE_INFLIGHT.set(self._total_inflight())
            if not t.cancelled() and t.exception() is not None:
                logger.error(
                    "queue message %s of %s/%s: %s",
                    entry_id,
                    tenant,
                    job,
                    t.exception(),
                    exc_info=t.exception(),
                )

        task.add_done_callback(done)

    # ------------------------------------------------------------ one message

    async def _handle(
        self, tenant: str, job: str, stream: str, entry_id: str, fields: dict | None, deliveries: int
    ) -> None:
        """Judge one message of ``tenant``'s job ``job`` (both from its stream, never from it)."""
        keys = self.tenant_keys[tenant]
        raw = (fields or {}).get("msg", "")
        at = _Where(keys, job, stream, entry_id)
        try:
            msg = QueueMessage.model_validate_json(raw)
        except ValidationError as exc:
            await self._dead_letter(at, raw, f"unreadable message: {exc}", deliveries)
            return
        if await self.redis.exists(keys.result(job, msg.request_id)):
            await self._ack(stream, entry_id)  # answered before (a reclaimed or repeated message)
            return
        if msg.job_id != job:
            err = ErrorResponse(
                error="wrong_job",
                message=f"this message names job {msg.job_id!r} but was sent on job {job!r}'s stream; "
                "it was not judged. Send each job's messages on its own stream (QueueReferee does).",
            )
            logger.warning("message %s on %s/%s names job %r: refused", entry_id, tenant, job, msg.job_id)
            await self._answer(at, msg, WRONG_JOB_STATUS, None, err, deliveries, time.time())
            return
        if msg.deadline is not None and time.time() >= msg.deadline:
            await self._expired(at, msg, deliveries, time.time())
            return
        if deliveries > self.settings.max_deliveries:  # consumers died judging it: a poison message
            error = f"delivered {deliveries} times without an answer (its consumers stopped while judging it)"
            await self._dead_letter(at, raw, error, deliveries, msg=msg, status=500)
            return
        if msg.schema_version != SCHEMA_VERSION:
            error = (
                f"schema_version {msg.schema_version} is not supported; this server speaks {SCHEMA_VERSION}"
            )
            await self._dead_letter(at, raw, error, deliveries, msg=msg, status=400)
            return
        picked = time.time()
        try:
            request = REQUEST_MODELS[msg.type].model_validate(msg.body)
            # Past the deadline the judging is cancelled (and with it its engine requests).
            left = None if msg.deadline is None else msg.deadline - time.time()
            # Admission waits for at most part of what is left (fairness.DEADLINE): a message that
            # cannot start in time is answered `expired` rather than cancelled part-way through.
            token = DEADLINE.set(None if left is None else time.monotonic() + left)
            try:
                response = await asyncio.wait_for(self._judge(msg.type, request, tenant, job), left)
            finally:
                DEADLINE.reset(token)
        except asyncio.TimeoutError:
            await self._expired(at, msg, deliveries, picked)
            return
        except ValidationError as exc:
            err = ErrorResponse(error="invalid_request", message=f"invalid {msg.type} request: {exc}")
            await self._answer(at, msg, 422, None, err, deliveries, picked)
            return
        except ClientError as exc:
            if exc.status in _RETRYABLE and deliveries < self.settings.max_deliveries:
                if self._stopping.is_set():  # refused because we are stopping: not its fault
                    await self._hand_back(stream, {entry_id: deliveries})
                return  # stays pending; reclaimed and retried later
            err = ErrorResponse(error=exc.code, message=exc.message)
            await self._answer(at, msg, exc.status, None, err, deliveries, picked)
            return
        except Exception as exc:
            logger.exception("judging %s %s failed (delivery %d)", msg.type, msg.request_id, deliveries)
            if deliveries >= self.settings.max_deliveries:
                error = f"{type(exc).__name__}: {exc}"
                await self._dead_letter(at, raw, error, deliveries, msg=msg, status=500)
            return  # otherwise stays pending for another delivery
        await self._answer(at, msg, 200, response.model_dump(mode="json"), None, deliveries, picked)

    async def _expired(self, at: _Where, msg: QueueMessage, deliveries, picked) -> None:
        late = time.time() - (msg.deadline or 0.0)
        err = ErrorResponse(
            error="expired",
            message=f"the request's deadline passed {late:.1f}s ago, before a judge answered it; it was "
            "not judged (or its judging was stopped). Send it again with a longer timeout if still needed.",
        )
        metrics.QUEUE_EXPIRED.inc()
        await self._answer(at, msg, EXPIRED_STATUS, None, err, deliveries, picked)

    async def _judge(self, type_: str, request, tenant: str, job: str):
        """Ask the service as a queued question: it waits for fair admission (by tenant weight,
        then job) rather than answering 429; the message is ours meanwhile (heartbeats keep it)."""
        return await getattr(self.service, type_)(request, tenant=tenant, job=job, queued=True)

    async def _answer(self, at: _Where, msg: QueueMessage, status, body, error, deliveries, picked) -> None:
        """Write the answer under the stream's tenant and job (whatever the message says), once."""
        now = time.time()
        reply = QueueReply(
            request_id=msg.request_id,
            status=status,
            body=body,
            error=error,
            attempts=deliveries,
            served_by=self.name,
            queued_s=max(0.0, picked - msg.sent_at),
            judged_s=now - picked,
        )

        async def write() -> int:
            return await self._reply_once(
                keys=[at.keys.result(at.job, msg.request_id), at.keys.reply(at.job, msg.request_id)],
                args=[reply.model_dump_json(), self.settings.reply_ttl_s],
            )

        # A judgement is worth keeping through a short Redis outage: retry the write, not the work.
        written = await self._retrying(write)
        metrics.QUEUE_MESSAGES.labels(msg.type, str(status), "answered" if written else "duplicate").inc()
        metrics.QUEUE_WAIT.observe(reply.queued_s)
        await self._retrying(lambda: self._ack(at.stream, at.entry_id))

    async def _retrying(self, command):
        """Run a Redis command, retrying connection errors for up to ``reclaim_idle_s`` (after which
        another consumer may have taken the message over anyway)."""
        give_up = time.monotonic() + self.settings.reclaim_idle_s
        failures = 0
        while True:
            try:
                return await command()
            except (RedisConnectionError, RedisTimeoutError):
                failures += 1
                delay = min(self.settings.reconnect_max_s, 0.05 * 2**failures) * (0.5 + random.random() / 2)
                if time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)

    async def _ack(self, stream: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, CONSUMER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)  # the answer is the record; keep the stream short
            await pipe.execute()

    async def _dead_letter(
        self, at: _Where, raw: str, error: str, deliveries: int, msg=None, status: int = 500
    ) -> None:
        """Record a message that cannot be judged in its tenant's dead-letter stream, bounded: its
        error, ids and the start of its payload (``dead_letter_msg_chars``) in a stream of about
        ``dead_letter_maxlen`` entries."""
        logger.error(
            "dead-lettering %s of %s/%s after %d deliveries: %s",
            at.entry_id,
            at.keys.tenant,
            at.job,
            deliveries,
            error,
        )
        limit = self.settings.dead_letter_msg_chars
        request_id = (
            msg.request_id if msg is not None else (m.group(1) if (m := _REQUEST_ID.search(raw)) else "")
        )
        entry = {
            "tenant": at.keys.tenant,
            "job_id": at.job,
            "entry_id": at.entry_id,
            "request_id": request_id,
            "type": msg.type if msg is not None else "",
            "error": error[:limit],
            "deliveries": deliveries,
            "msg": raw if len(raw) <= limit else f"{raw[:limit]}... [{len(raw) - limit} more characters cut]",
        }
        await self.redis.xadd(
            at.keys.dead_letter, entry, maxlen=self.settings.dead_letter_maxlen, approximate=True
        )
        metrics.QUEUE_DEAD_LETTERS.inc()
        if msg is not None:
            err = ErrorResponse(
                error="dead_letter", message=f"the request could not be judged: {error[:limit]}"
            )
            await self._answer(at, msg, status, None, err, deliveries, time.time())
        else:
            await self._ack(at.stream, at.entry_id)

    # ------------------------------------------------------------ housekeeping

    async def _announce(self) -> None:
        """Publish the judges and the senders' limits: ``max_backlog`` (per job), ``auth`` (1: keys
        required) and ``max_queued:<tenant>`` for tenants that have one."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.judges, self.service.describe().model_dump_json(), ex=60)
            pipe.hset(
                self.keys.limits,
                mapping={
                    "max_backlog": self.settings.max_backlog,
                    "max_jobs": self.settings.max_jobs_per_tenant,
                    "auth": 1 if self.auth else 0,
                    **blob_limits(self.service),
                },
            )
            capped = {
                f"max_queued:{n}": t.max_queued for n, t in self.tenant_settings.items() if t.max_queued
            }
            if capped:
                pipe.hset(self.keys.limits, mapping=capped)
            uncapped = [f"max_queued:{n}" for n, t in self.tenant_settings.items() if not t.max_queued]
            if uncapped:  # a cap removed from the settings
                pipe.hdel(self.keys.limits, *uncapped)
            await pipe.execute()

    async def _refresh_jobs(self) -> None:
        """Find every served tenant's active jobs (sent to within ``jobs_ttl_s``) and make sure
        their streams have the consumer group."""
        cutoff = time.time() - self.settings.jobs_ttl_s
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in self.tenants:
                # Its most recent jobs only: a tenant that lists millions cannot slow others' reads.
                pipe.zrevrangebyscore(
                    self.tenant_keys[tenant].jobs,
                    "+inf",
                    cutoff,
                    start=0,
                    num=self.settings.max_jobs_per_tenant,
                )
            listed = await pipe.execute()
        streams: dict[str, tuple[str, str]] = {}
        for tenant, jobs in zip(self.tenants, listed, strict=True):
            keys = self.tenant_keys[tenant]
            for job in jobs:
                if not valid_id(job):  # written by hand: a name that could leave its namespace
                    if (tenant, job) not in self._ignored:
                        self._ignored.add((tenant, job))
                        logger.warning(
                            "tenant %s lists a job named %r: not a valid job id, ignored", tenant, job
                        )
                    continue
                stream = keys.stream(job)
                if stream not in self._grouped:
                    try:
                        await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
                    except ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
                    self._grouped.add(stream)
                streams[stream] = (tenant, job)
        self._streams = streams

    async def _heartbeat(self) -> None:
        """Reset the idle time of messages this consumer is still judging, so none reclaims them."""
        for stream, ids in list(self._inflight.items()):
            if not ids:
                continue
            try:
                await self.redis.xclaim(stream, CONSUMER_GROUP, self.name, 0, list(ids), justid=True)
            except ResponseError as exc:  # the group is gone (Redis lost it): nothing to keep alive
                if "NOGROUP" not in str(exc):
                    raise

    async def _reclaim(self) -> None:
        """Take over messages left pending by consumers that stopped answering."""
        idle_ms = int(self.settings.reclaim_idle_s * 1000)
        for stream, (tenant, job) in list(self._streams.items()):
            try:
                _, entries, _ = await self.redis.xautoclaim(
                    stream, CONSUMER_GROUP, self.name, idle_ms, start_id="0-0", count=64
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    continue
                raise
            for entry_id, fields in entries:
                if entry_id in self._inflight[stream]:
                    continue
                pending = await self.redis.xpending_range(stream, CONSUMER_GROUP, entry_id, entry_id, 1)
                deliveries = pending[0]["times_delivered"] if pending else 1
                if fields is None:  # deleted from the stream while pending: nothing to judge
                    await self._ack(stream, entry_id)
                    continue
                metrics.QUEUE_RECLAIMED.inc()
                logger.warning("reclaimed %s of %s/%s (delivery %d)", entry_id, tenant, job, deliveries)
                self._start(tenant, job, stream, entry_id, fields, deliveries)

    async def _measure_backlog(self) -> None:
        """Messages not yet delivered to any consumer, all tenants' job streams together (the
        autoscaler's metric): a stream's length less its group's pending entries, since answered
        entries are deleted. Every replica publishes the same figure; scale on its maximum, not its
        sum."""
        streams = list(self._streams)
        if not streams:
            self.backlog = 0
            metrics.QUEUE_BACKLOG.set(0)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
                pipe.xpending(stream, CONSUMER_GROUP)
            replies = await pipe.execute(raise_on_error=False)
        total = 0
        for length, pending in zip(replies[::2], replies[1::2], strict=True):
            if isinstance(length, Exception):
                continue
            held = pending["pending"] if isinstance(pending, dict) else 0
            total += max(0, int(length) - int(held))
        self.backlog = total
        metrics.QUEUE_BACKLOG.set(total)

    async def _cleanup(self) -> None:
        """Bound what Redis keeps: forget jobs silent for ``jobs_ttl_s`` whose stream is empty (and
        delete the stream), drop job names that are not valid ids, and remove group members idle for
        ``dead_consumer_idle_s`` that hold nothing (consumers of stopped replicas; a live one
        re-joins by reading)."""
        cutoff = time.time() - self.settings.jobs_ttl_s
        for tenant in self.tenants:
            keys = self.tenant_keys[tenant]
            idle = await self.redis.zrangebyscore(keys.jobs, "-inf", f"({cutoff}", start=0, num=1000)
            for job in idle:
                if not valid_id(job):
                    await self.redis.zrem(keys.jobs, job)
                    continue
                stream = keys.stream(job)
                if await self._drop_idle_job(keys=[keys.jobs, stream], args=[job, cutoff]):
                    self._grouped.discard(stream)
                    logger.info("forgot idle job %s/%s", tenant, job)
        dead_ms = self.settings.dead_consumer_idle_s * 1000
        for stream in list(self._streams):
            try:
                members = await self.redis.xinfo_consumers(stream, CONSUMER_GROUP)
            except ResponseError as exc:
                if "NOGROUP" in str(exc) or "no such key" in str(exc):
                    continue
                raise
            for member in members:
                if member["name"] != self.name and member["pending"] == 0 and member["idle"] > dead_ms:
                    await self.redis.xgroup_delconsumer(stream, CONSUMER_GROUP, member["name"])
                    logger.info("removed idle consumer %s from %s", member["name"], stream)
