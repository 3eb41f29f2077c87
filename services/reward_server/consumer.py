"""The Redis queue consumer that runs inside every server replica.

It reads trainers' requests from the per-job streams through one consumer group and hands them to
the same ``JudgeService`` as the HTTP routes, so queued and HTTP questions meet in the same vLLM
batches. Its guarantees:

- fair sharing: each read takes at most ``read_count`` messages from every job's stream, a job has
  at most ``per_job_inflight`` messages in this consumer at once, and its engine requests carry a
  vLLM priority equal to the job's messages already in flight, so a job that floods the queue
  cannot starve a small one (a fair-queuing order inside the engine's waiting queue);
- nothing lost: a message is acknowledged only after its answer is written; the messages of a
  consumer that dies stay pending and are reclaimed (``XAUTOCLAIM``) after ``reclaim_idle_s``,
  while a live consumer refreshes the idle time of the messages it is still judging;
- nothing answered twice: the answer is written by a script that sets the request's result key
  only if it is absent, so a reclaimed message that was already answered is just acknowledged;
- nothing waits forever: a request that fails ``max_deliveries`` times, or cannot be read, goes to
  the dead-letter stream with its error, and its sender gets an error answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from referee.keys import CONSUMER_GROUP, Keys
from referee.protocol import REQUEST_MODELS, SCHEMA_VERSION, ErrorResponse, QueueMessage, QueueReply

from . import metrics
from .service import ClientError, JudgeService
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

_RETRYABLE = {429, 503}  # overloaded (while stopping) or unavailable: leave it pending, try later


class QueueConsumer:
    def __init__(self, service: JudgeService, settings: QueueSettings, redis: Redis | None = None) -> None:
        self.service = service
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.name = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.redis = redis or Redis.from_url(settings.url, decode_responses=True)
        self._reply_once = self.redis.register_script(_REPLY_ONCE)
        self._jobs: list[str] = []
        self._grouped: set[str] = set()
        self._inflight: dict[str, set[str]] = defaultdict(set)  # job -> entry ids being judged
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        while not self.service.ready:
            if self.service.load_error:
                return
            await asyncio.sleep(0.5)
        logger.info("queue consumer %s reading %s", self.name, self.keys.stream("*"))
        last_jobs = last_reclaim = last_announce = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now - last_announce > 20:
                await self._announce()
                last_announce = now
            if now - last_jobs > 1.0:
                await self._refresh_jobs()
                last_jobs = now
            if now - last_reclaim > self.settings.reclaim_every_s:
                await self._heartbeat()
                await self._reclaim()
                last_reclaim = now
            await self._read()

    async def stop(self, drain_s: float = 30.0) -> None:
        """Stop reading; let messages being judged finish (unfinished ones stay pending)."""
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=drain_s)
        await self.redis.aclose()

    def _total_inflight(self) -> int:
        return sum(len(ids) for ids in self._inflight.values())

    async def _read(self) -> None:
        s = self.settings
        eligible = [j for j in self._jobs if len(self._inflight[j]) < s.per_job_inflight]
        if not eligible or self._total_inflight() >= s.max_inflight:
            if self._tasks:
                await asyncio.wait(
                    self._tasks, timeout=s.block_ms / 1000, return_when=asyncio.FIRST_COMPLETED
                )
            else:
                await asyncio.sleep(s.block_ms / 1000)
            return
        streams = {self.keys.stream(j): ">" for j in eligible}
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
            job = self.keys.job_from_stream(stream)
            for entry_id, fields in entries:
                self._start(job, stream, entry_id, fields, deliveries=1)

    def _start(self, job: str, stream: str, entry_id: str, fields: dict | None, deliveries: int) -> None:
        if entry_id in self._inflight[job]:
            return
        # The job's messages already in flight here: vLLM serves lower numbers first.
        priority = len(self._inflight[job])
        self._inflight[job].add(entry_id)
        metrics.QUEUE_INFLIGHT.set(self._total_inflight())
        task = asyncio.create_task(self._handle(job, stream, entry_id, fields, deliveries, priority))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._inflight[job].discard(entry_id)
            metrics.QUEUE_INFLIGHT.set(self._total_inflight())
            if not t.cancelled() and t.exception() is not None:
                logger.error("queue message %s of job %s: %r", entry_id, job, t.exception())

        task.add_done_callback(done)

    # ------------------------------------------------------------ one message

    async def _handle(
        self, job: str, stream: str, entry_id: str, fields: dict | None, deliveries: int, priority: int
    ) -> None:
        raw = (fields or {}).get("msg", "")
        try:
            msg = QueueMessage.model_validate_json(raw)
        except ValidationError as exc:
            await self._dead_letter(job, stream, entry_id, raw, f"unreadable message: {exc}", deliveries)
            return
        if await self.redis.exists(self.keys.result(msg.request_id)):
            await self._ack(stream, entry_id)  # answered before (a reclaimed or repeated message)
            return
        if deliveries > self.settings.max_deliveries:  # consumers died judging it: a poison message
            error = f"delivered {deliveries} times without an answer (its consumers stopped while judging it)"
            await self._dead_letter(job, stream, entry_id, raw, error, deliveries, msg=msg, status=500)
            return
        if msg.schema_version != SCHEMA_VERSION:
            error = (
                f"schema_version {msg.schema_version} is not supported; this server speaks {SCHEMA_VERSION}"
            )
            await self._dead_letter(job, stream, entry_id, raw, error, deliveries, msg=msg, status=400)
            return
        picked = time.time()
        try:
            request = REQUEST_MODELS[msg.type].model_validate(msg.body)
            response = await self._judge(msg.type, request, priority)
        except ValidationError as exc:
            err = ErrorResponse(error="invalid_request", message=f"invalid {msg.type} request: {exc}")
            await self._answer(stream, entry_id, msg, 422, None, err, deliveries, picked)
            return
        except ClientError as exc:
            if exc.status in _RETRYABLE and deliveries < self.settings.max_deliveries:
                return  # stays pending; reclaimed and retried later
            err = ErrorResponse(error=exc.code, message=exc.message)
            await self._answer(stream, entry_id, msg, exc.status, None, err, deliveries, picked)
            return
        except Exception as exc:
            logger.exception("judging %s %s failed (delivery %d)", msg.type, msg.request_id, deliveries)
            if deliveries >= self.settings.max_deliveries:
                await self._dead_letter(
                    job,
                    stream,
                    entry_id,
                    raw,
                    f"{type(exc).__name__}: {exc}",
                    deliveries,
                    msg=msg,
                    status=500,
                )
            return  # otherwise stays pending for another delivery
        await self._answer(
            stream, entry_id, msg, 200, response.model_dump(mode="json"), None, deliveries, picked
        )

    async def _judge(self, type_: str, request, priority: int):
        """Ask the service; while it is at its in-flight bound (429), wait here rather than fail:
        the message is ours (heartbeats keep it) and waiting costs no delivery."""
        delay = 0.02
        while True:
            try:
                return await getattr(self.service, type_)(request, priority=priority)
            except ClientError as exc:
                if exc.status != 429 or self._stopping.is_set():
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _answer(
        self, stream, entry_id, msg: QueueMessage, status, body, error, deliveries, picked
    ) -> None:
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
        written = await self._reply_once(
            keys=[self.keys.result(msg.request_id), self.keys.reply(msg.request_id)],
            args=[reply.model_dump_json(), self.settings.reply_ttl_s],
        )
        metrics.QUEUE_MESSAGES.labels(msg.type, str(status), "answered" if written else "duplicate").inc()
        metrics.QUEUE_WAIT.observe(reply.queued_s)
        await self._ack(stream, entry_id)

    async def _ack(self, stream: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, CONSUMER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)  # the answer is the record; keep the stream short
            await pipe.execute()

    async def _dead_letter(self, job, stream, entry_id, raw, error, deliveries, msg=None, status=500) -> None:
        logger.error("dead-lettering %s of job %s after %d deliveries: %s", entry_id, job, deliveries, error)
        await self.redis.xadd(
            self.keys.dead_letter,
            {"job_id": job, "entry_id": entry_id, "error": error, "deliveries": deliveries, "msg": raw},
            maxlen=100_000,
            approximate=True,
        )
        metrics.QUEUE_DEAD_LETTERS.inc()
        if msg is not None:
            err = ErrorResponse(error="dead_letter", message=f"the request could not be judged: {error}")
            await self._answer(stream, entry_id, msg, status, None, err, deliveries, time.time())
        else:
            await self._ack(stream, entry_id)

    # ------------------------------------------------------------ housekeeping

    async def _announce(self) -> None:
        await self.redis.set(self.keys.judges, self.service.describe().model_dump_json(), ex=60)

    async def _refresh_jobs(self) -> None:
        cutoff = time.time() - self.settings.jobs_ttl_s
        jobs = await self.redis.zrangebyscore(self.keys.jobs, cutoff, "+inf")
        for job in jobs:
            if job in self._grouped:
                continue
            try:
                await self.redis.xgroup_create(self.keys.stream(job), CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._grouped.add(job)
        self._jobs = jobs

    async def _heartbeat(self) -> None:
        """Reset the idle time of messages this consumer is still judging, so none reclaims them."""
        for job, ids in list(self._inflight.items()):
            if ids:
                await self.redis.xclaim(
                    self.keys.stream(job), CONSUMER_GROUP, self.name, 0, list(ids), justid=True
                )

    async def _reclaim(self) -> None:
        """Take over messages left pending by consumers that stopped answering."""
        idle_ms = int(self.settings.reclaim_idle_s * 1000)
        for job in self._jobs:
            stream = self.keys.stream(job)
            try:
                _, entries, _ = await self.redis.xautoclaim(
                    stream, CONSUMER_GROUP, self.name, idle_ms, start_id="0-0", count=64
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    continue
                raise
            for entry_id, fields in entries:
                if entry_id in self._inflight[job]:
                    continue
                pending = await self.redis.xpending_range(stream, CONSUMER_GROUP, entry_id, entry_id, 1)
                deliveries = pending[0]["times_delivered"] if pending else 1
                if fields is None:  # deleted from the stream while pending: nothing to judge
                    await self._ack(stream, entry_id)
                    continue
                metrics.QUEUE_RECLAIMED.inc()
                logger.warning("reclaimed %s of job %s (delivery %d)", entry_id, job, deliveries)
                self._start(job, stream, entry_id, fields, deliveries)
