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
  the result key holds the answer itself, so a sender whose popped reply was lost on the way
  (a read cut off after Redis popped it) reads it back from there;
- nothing waits forever: a request that fails ``max_deliveries`` times goes to the dead-letter
  stream with its error, and its sender gets an error answer; a message past its ``deadline`` gets
  an ``expired`` answer (status 504) without being judged;
- bounded reads: messages are read (and reclaimed) through a script (``_READ``) that hands back a
  message of at most ``max_message_bytes`` whole, and of any other entry (larger, or with fields
  other than ``msg``) only its id, its size and its first ``dead_letter_msg_chars`` bytes, so no
  entry a tenant wrote by hand can exhaust a consumer's memory or outlast its Redis timeouts; each
  message is decoded on its own, so one that is not UTF-8 or not JSON spoils nothing else of its
  batch. Such an entry is dead-lettered at its first delivery with its reason, its sender answered
  (413 ``too_large``, 400 or 422) when its request id can be read from its first bytes, and
  acknowledged;
- one tenant's keys cannot stop the consumer: a key of the wrong type where a jobs set or a job's
  stream belongs is skipped (and removed), and what tenants may write by hand is bounded after the
  fact (``_sweep``, every ``cleanup_every_s`` and whenever Redis is out of memory): uploads get
  their TTL, oversized ones and those beyond the tenant's upload budget are removed, and so are
  streams no job lists;
- faults: ``run()`` reconnects with jittered backoff after any Redis error and recreates the
  consumer groups, and reports its ``state`` (``/readyz``); answers are written through short
  outages rather than judged again;
- senders' scripts: tenants may not load scripts (``referee.acl``), only run cached ones by SHA1,
  so the consumer loads ``referee.scripts.TENANT_SCRIPTS`` on every (re)connect, before it reports
  ``consuming``, and checks every second that Redis still has them (a restart that redis-py rode
  out without an error, a ``SCRIPT FLUSH``), loading them again if not;
- bounded: dead-letter entries (one stream per tenant: they hold payloads) are cut and the stream
  capped; idle jobs and dead group members are removed; the message size limit
  (``max_message_bytes``), the per-job backlog cap (``max_backlog``), each tenant's cap on its
  waiting messages (``max_queued:<tenant>``) and whether keys are required (``auth``) are published
  for senders, which enforce them, in the shared limits hash and in each served tenant's copy (the
  one the senders' scripts read, in the tenant's slot), with the key layout (``key_layout``);
- Redis Cluster (a ``redis+cluster://`` URL, ``referee.connect``): every script touches one tenant's
  keys, so one slot; a read of several tenants' streams is one script per slot; the sweep scans
  every primary; the senders' scripts are loaded on every primary (and again on a promoted replica,
  which lacks them: scripts are not replicated);
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
from redis.client import NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, NoScriptError, OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from referee.auth import OPEN_TENANT
from referee.connection import connect, is_cluster, key_slot
from referee.keys import CONSUMER_GROUP, KEY_LAYOUT, Keys, valid_id
from referee.protocol import REQUEST_MODELS, SCHEMA_VERSION, ErrorResponse, QueueMessage, QueueReply
from referee.scripts import TENANT_SCRIPTS, sha1

from . import metrics
from .errors import ClientError
from .fairness import DEADLINE
from .health import health_limits
from .media import blob_limits
from .service import JudgeService
from .settings import QueueSettings

logger = logging.getLogger(__name__)

# Set the result key and push the answer only if no answer was written before. The result key
# holds the answer too: a sender whose popped reply never reached it (its connection dropped
# between Redis' pop and its read) reads the answer back from there.
_REPLY_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# Acknowledge a message and delete it from its stream (the answer is the record; the stream stays
# short), at once: one key, so one slot on a cluster (where a MULTI pipeline is not to be had).
_ACK = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
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

# Read (ARGV[6] 'read': XREADGROUP '>') or reclaim (XAUTOCLAIM of entries idle ARGV[7] ms) up to
# ARGV[3] entries of each stream of KEYS for consumer ARGV[2] of group ARGV[1]. An entry whose one
# field is msg, of at most ARGV[4] bytes, comes back whole; of any other only its id, its size and
# the first ARGV[5] bytes of its msg field: the consumer never loads more (the script, inside Redis,
# does). Per stream: {error or '', then per entry its id, status (ok, too_large, shape or gone),
# size (msg's bytes; the entry's for shape), deliveries, msg or its start}. pcall: a stream removed
# or replaced under us (NOGROUP, WRONGTYPE) is that stream's error, not the others'.
_READ = """
local group, consumer, count, read = ARGV[1], ARGV[2], ARGV[3], ARGV[6] == 'read'
local max, head = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for i, stream in ipairs(KEYS) do
  local reply
  if read then
    reply = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, '>')
  else
    reply = redis.pcall('XAUTOCLAIM', stream, group, consumer, ARGV[7], '0-0', 'COUNT', count)
  end
  local result = {''}
  local function add(id, status, size, deliveries, data)
    for _, value in ipairs({id, status, size, deliveries, data}) do result[#result + 1] = value end
  end
  if type(reply) == 'table' and reply.err then
    result[1] = reply.err
  elseif reply then
    local entries = read and reply[1][2] or reply[2]
    for _, entry in ipairs(entries) do
      local id, fields, deliveries = entry[1], entry[2], 1
      if not read then
        local pending = redis.call('XPENDING', stream, group, id, id, 1)
        if pending[1] then deliveries = pending[1][4] end
      end
      if not fields then
        add(id, 'gone', 0, deliveries, '')
      elseif #fields == 2 and fields[1] == 'msg' then
        local size = string.len(fields[2])
        if size <= max then
          add(id, 'ok', size, deliveries, fields[2])
        else
          add(id, 'too_large', size, deliveries, string.sub(fields[2], 1, head))
        end
      else
        local size, start = 0, ''
        for j = 1, #fields do
          size = size + string.len(fields[j])
          if j % 2 == 1 and fields[j] == 'msg' and start == '' then
            start = string.sub(fields[j + 1], 1, head)
          end
        end
        add(id, 'shape', size, deliveries, start)
      end
    end
    if not read then
      for _, id in ipairs(reply[3] or {}) do add(id, 'gone', 0, 0, '') end
    end
  end
  out[i] = result
end
return out
"""
_READ_SHA = sha1(_READ)

# Remove a job's stream that the tenant's jobs set does not list: written by hand (the send script
# lists every job it writes to), it would never be read nor removed.
_DROP_UNLISTED = """
local listed = redis.pcall('ZSCORE', KEYS[1], ARGV[1])
if listed == false and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

_RETRYABLE = {429, 503}  # overloaded (while stopping) or unavailable: leave it pending, try later
WRONG_JOB_STATUS = 403  # a message naming another job than its stream's: not judged
EXPIRED_STATUS = 504  # an expired message's reply: the judge did not get to it before its deadline
SEND_CLOCK_MARGIN_S = 2.0  # senders' clocks against this consumer's (job scores are senders' time)
HAND_BACK_IDLE_MS = 10**9  # idle time given to handed-back messages: any consumer reclaims them at once
_REQUEST_ID = re.compile(r'"request_id"\s*:\s*"([^"]{1,128})"')
_TYPE = re.compile(r'"type"\s*:\s*"(score|pairwise|judge|winrate)"')
_SWEEP_COUNT = 1000  # keys per SCAN call of a sweep
# What a sweep looks at in a tenant's namespace: kind -> (the rest of the key's name, or its start
# when it ends with ':'; the key's type).
_SWEPT = {
    "upload": ("blob:", "string"),
    "counter": ("blob-bytes", "string"),
    "stream": ("requests:", "stream"),
    "jobs": ("jobs", "zset"),
}


def _named(rest: str, named: str) -> bool:
    return rest.startswith(named) if named.endswith(":") else rest == named


def _wrong_type(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc)


def _out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write because it is full (``maxmemory``, ``noeviction``)."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "used memory > 'maxmemory'" in str(exc)
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    """A stream entry as ``_READ`` hands it back: the message (``status`` ``ok``) or, for an entry
    that was not read (``too_large``: its msg over the limit; ``shape``: fields other than one msg;
    ``gone``: deleted while pending), its start only."""

    id: str
    status: str
    size: int
    deliveries: int
    data: bytes


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
        self.redis = redis or connect(
            settings.url,
            decode_responses=True,
            socket_timeout=settings.socket_timeout_s + settings.block_ms / 1000,
            socket_connect_timeout=settings.socket_timeout_s,
            # A connection broken by a Redis restart is retried on a fresh one (redis-py's URL
            # clients retry nothing by default); a Redis that stays down raises to run().
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
        )
        self.cluster = is_cluster(self.redis)  # reads of several tenants' streams go slot by slot
        self._reply_once = self.redis.register_script(_REPLY_ONCE)
        self._ack_script = self.redis.register_script(_ACK)
        self._drop_idle_job = self.redis.register_script(_DROP_IDLE_JOB)
        self._drop_unlisted = self.redis.register_script(_DROP_UNLISTED)
        self._may_check_scripts = True  # SCRIPT EXISTS allowed (else SCRIPT LOAD every check)
        self._may_sweep = True  # SCAN, TYPE, PTTL and STRLEN allowed (an older ACL file lacks them)
        self._streams: dict[str, tuple[str, str]] = {}  # active job stream -> (tenant, job)
        self.send_clock_margin_s = SEND_CLOCK_MARGIN_S
        self._sent_at: dict[str, float] = {}  # job stream -> its last send (the jobs set's score)
        self._drained_at: dict[str, float] = {}  # job stream -> when a read last found it empty
        self._grouped: set[str] = set()  # streams whose consumer group exists
        self._ignored: set[tuple[str, str]] = set()  # (tenant, job id or key) skipped, logged once
        self._streams_seen: set[str] = set()  # job streams found by the last sweep
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
        self.sweeps = 0  # whole passes of _sweep over the tenants' namespaces

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
                if _out_of_memory(exc):  # removing is allowed in a full Redis: make room if tenants took it
                    try:
                        await self._sweep()
                    except RedisError as sweep_error:
                        logger.warning("sweeping a full Redis failed: %s", sweep_error)
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
        turns = order[self._turn :] + order[: self._turn]  # take turns
        # Streams that may hold messages first: a job sent to since its stream was last read empty
        # (the jobs set's score is the last send), then the drained ones. Otherwise a tenant's many
        # idle jobs fill the read window and a live job waits for the window to come round to it.
        turns.sort(key=lambda item: not self._maybe_waiting(item[0]))
        for stream, (tenant, _) in turns:
            if (
                len(self._inflight[stream]) < s.per_job_inflight_messages
                and room[tenant] > 0
                and total_room > 0
            ):
                eligible.append(stream)
                room[tenant] -= s.read_count
                total_room -= s.read_count
        if not eligible or self._total_inflight() >= s.max_inflight_messages:
            await self._idle()
            return
        read_at = time.time()
        batches = await self._fetch(eligible, count=s.read_count)
        got = False
        for stream in eligible:
            if not batches.get(stream):
                self._drained_at[stream] = read_at
        for stream, entries in batches.items():
            if not entries:
                continue
            got = True
            self._drained_at.pop(stream, None)
            if self._stopping.is_set() or stream not in self._streams:
                # read while stop() began (or a job forgotten meanwhile): not ours to judge
                await self._hand_back(stream, {e.id: 1 for e in entries if e.status != "gone"})
                continue
            tenant, job = self._streams[stream]
            for entry in entries:
                self._start(tenant, job, stream, entry)
        if not got:
            await self._idle()

    def _maybe_waiting(self, stream: str) -> bool:
        """Whether the stream may hold unread messages: never read empty, or sent to since (with
        a margin for the senders' clocks, whose time the jobs set's scores are)."""
        drained = self._drained_at.get(stream)
        return drained is None or self._sent_at.get(stream, 0.0) >= drained - self.send_clock_margin_s

    async def _idle(self) -> None:
        """Nothing to read (or no room to): wait ``block_ms``, less if a message finishes or the
        consumer stops. Reads do not block in Redis: they run in a script, which cannot."""
        timeout = self.settings.block_ms / 1000
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout)

    async def _fetch(
        self, streams: list[str], *, count: int, idle_ms: int | None = None
    ) -> dict[str, list[_Entry]]:
        """Read (``idle_ms`` None) or reclaim up to ``count`` entries of each stream through
        ``_READ``: whole messages within ``max_message_bytes``, the start of anything else. Its reply
        is never decoded as a whole (``NEVER_DECODE``): each message is decoded on its own. A stream
        whose group is gone makes the consumer look for its jobs again; one that is no longer a
        stream is skipped."""
        s = self.settings
        args = [
            CONSUMER_GROUP,
            self.name,
            count,
            s.max_message_bytes,
            s.dead_letter_msg_chars,
            "read" if idle_ms is None else "claim",
            idle_ms or 0,
        ]

        async def run(group: list[str]):
            return await self.redis.execute_command(
                "EVALSHA", _READ_SHA, len(group), *group, *args, **{NEVER_DECODE: True}
            )

        async def read(group: list[str]):
            try:
                return await run(group)
            except NoScriptError:
                await self.redis.script_load(_READ)
                return await run(group)

        if self.cluster:  # a script's keys must share a slot: one read per tenant (hash tag)
            by_slot: dict[int, list[str]] = defaultdict(list)
            for stream in streams:
                by_slot[key_slot(stream)].append(stream)
            groups = list(by_slot.values())
            replies = await asyncio.gather(*(read(group) for group in groups))
            found = {
                st: r
                for group, rs in zip(groups, replies, strict=True)
                for st, r in zip(group, rs, strict=True)
            }
            reply = [found[stream] for stream in streams]
        else:
            reply = await read(streams)
        batches: dict[str, list[_Entry]] = {}
        regroup = False
        for stream, result in zip(streams, reply, strict=True):
            error = result[0].decode(errors="replace") if result[0] else ""
            if error:
                if "NOGROUP" in error:
                    regroup = True
                    self._grouped.discard(stream)
                elif "WRONGTYPE" not in error:
                    raise ResponseError(f"reading {stream}: {error}")
                continue
            items = result[1:]
            batches[stream] = [
                _Entry(
                    items[k].decode(),
                    items[k + 1].decode(),
                    int(items[k + 2]),
                    int(items[k + 3]),
                    items[k + 4],
                )
                for k in range(0, len(items), 5)
            ]
        if regroup:  # a stream or group removed under us: rediscover
            await self._refresh_jobs()
        return batches

    def _start(self, tenant: str, job: str, stream: str, entry: _Entry) -> None:
        if entry.id in self._inflight[stream]:
            return
        entry_id = entry.id
        self._inflight[stream][entry_id] = entry.deliveries
        metrics.QUEUE_INFLIGHT.set(self._total_inflight())
        task = asyncio.create_task(self._handle(tenant, job, stream, entry))
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

    async def _handle(self, tenant: str, job: str, stream: str, entry: _Entry) -> None:
        """Judge one message of ``tenant``'s job ``job`` (both from its stream, never from it)."""
        keys = self.tenant_keys[tenant]
        entry_id, deliveries = entry.id, entry.deliveries
        at = _Where(keys, job, stream, entry_id)
        if entry.status != "ok":
            await self._unread(at, entry)
            return
        try:
            raw = entry.data.decode()
        except UnicodeDecodeError as exc:
            error = f"unreadable message: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            await self._unreadable(at, entry, error, 400, "bad_request")
            return
        try:
            msg = QueueMessage.model_validate_json(raw)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                await self._unreadable(at, entry, f"unreadable message: {exc}", 400, "bad_request")
            else:
                await self._unreadable(at, entry, f"unreadable message: {exc}", 422, "invalid_request")
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
        await self._reply(at, msg.request_id, msg.type, msg.sent_at, status, body, error, deliveries, picked)

    async def _reply(
        self, at: _Where, request_id: str, type_: str, sent_at: float, status, body, error, deliveries, picked
    ) -> None:
        """Write an answer to ``request_id`` of the stream's tenant and job, once; acknowledge."""
        now = time.time()
        reply = QueueReply(
            request_id=request_id,
            status=status,
            body=body,
            error=error,
            attempts=deliveries,
            served_by=self.name,
            queued_s=max(0.0, picked - sent_at),
            judged_s=now - picked,
        )

        async def write() -> int:
            return await self._reply_once(
                keys=[at.keys.result(at.job, request_id), at.keys.reply(at.job, request_id)],
                args=[reply.model_dump_json(), self.settings.reply_ttl_s],
            )

        # A judgement is worth keeping through a short Redis outage: retry the write, not the work.
        written = await self._retrying(write)
        metrics.QUEUE_MESSAGES.labels(type_, str(status), "answered" if written else "duplicate").inc()
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
        await self._ack_script(keys=[stream], args=[CONSUMER_GROUP, entry_id])

    async def _dead_letter(self, at: _Where, raw: str, error: str, deliveries: int, msg, status: int) -> None:
        """Record a message that cannot be judged in its tenant's dead-letter stream and answer its
        sender with ``status``."""
        limit = self.settings.dead_letter_msg_chars
        shown = raw if len(raw) <= limit else f"{raw[:limit]}... [{len(raw) - limit} more characters cut]"
        await self._record_dead_letter(at, msg.request_id, msg.type, error, deliveries, shown)
        err = ErrorResponse(error="dead_letter", message=f"the request could not be judged: {error[:limit]}")
        await self._answer(at, msg, status, None, err, deliveries, time.time())

    async def _unread(self, at: _Where, entry: _Entry) -> None:
        """An entry ``_READ`` did not hand back: over ``max_message_bytes``, or not one msg field."""
        if entry.status == "gone":  # deleted from the stream while pending: nothing to judge
            await self._ack(at.stream, at.entry_id)
        elif entry.status == "too_large":
            limit = self.settings.max_message_bytes
            error = (
                f"unreadable message: {entry.size} bytes, over the queue's limit of {limit} "
                "(queue.max_message_bytes); it was not read. Send fewer items per request, and images "
                "as uploads (QueueReferee uploads inline images)"
            )
            await self._unreadable(at, entry, error, 413, "too_large")
        else:
            error = (
                f"unreadable message: a queued message is a stream entry with one field, msg; this one "
                f"has others ({entry.size} bytes in all); it was not read"
            )
            await self._unreadable(at, entry, error, 400, "bad_request")

    async def _unreadable(self, at: _Where, entry: _Entry, error: str, status: int, code: str) -> None:
        """Dead-letter an entry that is not a message, at once (another delivery cannot mend it),
        with its reason and its start; answer its sender with ``status`` when a request id can be
        read from that start (the reply goes to the stream's tenant and job, whatever it says), and
        acknowledge it."""
        limit = self.settings.dead_letter_msg_chars
        text = entry.data.decode(errors="replace")  # all of it when read (within the limit), else its start
        head = text[:limit]
        if entry.status != "ok":
            shown = f"{head}... [{entry.size} bytes in all, not read]"
        else:
            shown = text if len(text) <= limit else f"{head}... [{len(text) - limit} more characters cut]"
        found = _REQUEST_ID.search(head)
        request_id = found.group(1) if found and valid_id(found.group(1)) else ""
        kind = found.group(1) if (found := _TYPE.search(head)) else ""
        await self._record_dead_letter(at, request_id, kind, error, entry.deliveries, shown)
        if request_id:
            err = ErrorResponse(error=code, message=error[:limit])
            now = time.time()
            await self._reply(
                at, request_id, kind or "unknown", now, status, None, err, entry.deliveries, now
            )
        else:
            await self._ack(at.stream, at.entry_id)

    async def _record_dead_letter(
        self, at: _Where, request_id: str, type_: str, error: str, deliveries: int, shown: str
    ) -> None:
        """An entry of the tenant's dead-letter stream, bounded: its error and ids, and the start of
        its payload (``dead_letter_msg_chars``), in a stream of about ``dead_letter_maxlen`` entries."""
        logger.error(
            "dead-lettering %s of %s/%s after %d deliveries: %s",
            at.entry_id,
            at.keys.tenant,
            at.job,
            deliveries,
            error,
        )
        entry = {
            "tenant": at.keys.tenant,
            "job_id": at.job,
            "entry_id": at.entry_id,
            "request_id": request_id,
            "type": type_,
            "error": error[: self.settings.dead_letter_msg_chars],
            "deliveries": deliveries,
            "msg": shown,
        }
        await self.redis.xadd(
            at.keys.dead_letter, entry, maxlen=self.settings.dead_letter_maxlen, approximate=True
        )
        metrics.QUEUE_DEAD_LETTERS.inc()

    # ------------------------------------------------------------ housekeeping

    async def _announce(self) -> None:
        """Publish the judges and the senders' limits: ``max_message_bytes``, ``max_backlog`` (per
        job), ``auth`` (1: keys required), the upload limits and ``max_queued:<tenant>`` for tenants
        that have one."""
        shared = {
            "key_layout": KEY_LAYOUT,
            "max_message_bytes": self.settings.max_message_bytes,
            "max_backlog": self.settings.max_backlog,
            "max_jobs": self.settings.max_jobs_per_tenant,
            "auth": 1 if self.auth else 0,
            **health_limits(self.service),
            **blob_limits(self.service),
        }
        capped = {f"max_queued:{n}": t.max_queued for n, t in self.tenant_settings.items() if t.max_queued}
        uncapped = [f"max_queued:{n}" for n, t in self.tenant_settings.items() if not t.max_queued]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.judges, self.service.describe().model_dump_json(), ex=60)
            pipe.hset(self.keys.limits, mapping={**shared, **capped})
            if uncapped:  # a cap removed from the settings
                pipe.hdel(self.keys.limits, *uncapped)
            # Each tenant's copy, in its own slot, for the senders' scripts (a script on a cluster
            # cannot read the shared hash); the open tenant's too, so that a keyless sender is told
            # keys are required.
            for tenant in dict.fromkeys([*self.tenants, OPEN_TENANT]):
                own = self.tenant_keys.get(tenant) or Keys(self.settings.prefix, tenant)
                field = f"max_queued:{tenant}"
                pipe.hset(
                    own.tenant_limits, mapping={**shared, **{k: v for k, v in capped.items() if k == field}}
                )
                if field not in capped:
                    pipe.hdel(own.tenant_limits, field)
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
                    withscores=True,
                )
            listed = await pipe.execute(raise_on_error=False)
        streams: dict[str, tuple[str, str]] = {}
        for tenant, jobs in zip(self.tenants, listed, strict=True):
            keys = self.tenant_keys[tenant]
            if isinstance(jobs, Exception):
                if not _wrong_type(jobs):
                    raise jobs
                self._skip(tenant, keys.jobs, "its jobs set is not a sorted set")  # the sweep removes it
                continue
            for job, sent_at in jobs:
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
                        if _wrong_type(exc):
                            self._skip(tenant, stream, "the job's stream is not a stream")
                            continue
                        if "BUSYGROUP" not in str(exc):
                            raise
                    self._grouped.add(stream)
                streams[stream] = (tenant, job)
                self._sent_at[stream] = sent_at
        self._streams = streams
        for gone in set(self._sent_at) - set(streams):
            self._sent_at.pop(gone, None)
            self._drained_at.pop(gone, None)

    def _skip(self, tenant: str, key: str, why: str) -> None:
        """Log once that a key of a tenant's is skipped (written by hand, of the wrong type)."""
        if (tenant, key) not in self._ignored:
            self._ignored.add((tenant, key))
            logger.warning("tenant %s: %s is skipped: %s", tenant, key, why)

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
        """Take over messages left pending by consumers that stopped answering: up to
        ``per_job_inflight_messages`` of each job at a time, read like new ones (``_fetch``)."""
        idle_ms = int(self.settings.reclaim_idle_s * 1000)
        count = self.settings.per_job_inflight_messages
        for stream, (tenant, job) in list(self._streams.items()):
            for entry in (await self._fetch([stream], count=count, idle_ms=idle_ms)).get(stream, []):
                if entry.id in self._inflight[stream]:
                    continue
                if entry.status == "gone":  # deleted from the stream while pending: nothing to judge
                    await self._ack(stream, entry.id)
                    continue
                metrics.QUEUE_RECLAIMED.inc()
                logger.warning("reclaimed %s of %s/%s (delivery %d)", entry.id, tenant, job, entry.deliveries)
                self._start(tenant, job, stream, entry)

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
        re-joins by reading); then sweep what tenants wrote by hand (``_sweep``)."""
        cutoff = time.time() - self.settings.jobs_ttl_s
        for tenant in self.tenants:
            keys = self.tenant_keys[tenant]
            try:
                idle = await self.redis.zrangebyscore(keys.jobs, "-inf", f"({cutoff}", start=0, num=1000)
            except ResponseError as exc:
                if not _wrong_type(exc):
                    raise
                continue  # not a sorted set: the sweep below removes it
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
                if "NOGROUP" in str(exc) or "no such key" in str(exc) or _wrong_type(exc):
                    continue
                raise
            for member in members:
                if member["name"] != self.name and member["pending"] == 0 and member["idle"] > dead_ms:
                    await self.redis.xgroup_delconsumer(stream, CONSUMER_GROUP, member["name"])
                    logger.info("removed idle consumer %s from %s", member["name"], stream)
        await self._sweep()

    async def _sweep(self) -> None:
        """Bound what tenants may write by hand in their namespaces (Redis runs the senders' scripts
        with the tenant's own rights, so the writes they make are the tenant's to make without them;
        ``referee.acl``): one pass of ``SCAN`` over the served tenants' keys, reading types, TTLs and
        lengths, never a value. Uploads get at most the upload TTL; one over ``max_image_bytes`` is
        removed, and a tenant's uploads beyond ``tenant_blob_bytes``, newest first (the upload
        script keeps a tenant within it, so only uploads made by hand go). The upload counter gets
        its TTL. A key of the wrong type where a job's stream, the jobs set, an upload or the counter
        belongs is removed, and so is a job's stream that no job lists and that was there at the last
        sweep already (the send script lists every job it writes to; a stream written by hand a
        moment before its job is listed is left alone). Runs on a full Redis too: these commands
        may."""
        if not self._may_sweep:
            return
        limits = blob_limits(self.service)
        uploads: dict[str, list[tuple[int, int, str]]] = defaultdict(list)  # tenant -> (TTL, size, key)
        seen: set[str] = set()
        removed: dict[tuple[str, str], int] = defaultdict(int)  # (tenant, why) -> keys removed
        try:
            # Every primary's keys on a cluster (redis-py's cluster scan_iter goes node by node).
            batch = []
            async for name in self.redis.scan_iter(match=self.keys.tenants_pattern, count=_SWEEP_COUNT):
                batch.append(name)
                if len(batch) >= _SWEEP_COUNT:
                    await self._sweep_keys(batch, limits, uploads, seen, removed)
                    batch = []
            if batch:
                await self._sweep_keys(batch, limits, uploads, seen, removed)
        except NoPermissionError as exc:
            self._may_sweep = False
            logger.warning(
                "the server's Redis user may not sweep the tenants' namespaces (%s): what tenants write "
                "by hand is not bounded; regenerate the ACL file (`referee redis-acl`)",
                exc,
            )
            return
        budget = limits["tenant_blob_bytes"]
        for tenant, kept in uploads.items():
            total, doomed = sum(size for _, size, _ in kept), []
            for _, size, name in sorted(kept, reverse=True):  # the newest (most TTL left) first
                if total <= budget:
                    break
                doomed.append(name)
                total -= size
            for k in range(0, len(doomed), _SWEEP_COUNT):
                await self.redis.delete(*doomed[k : k + _SWEEP_COUNT])
            if doomed:
                removed[(tenant, f"uploads beyond media.tenant_blob_bytes ({budget})")] += len(doomed)
        for (tenant, why), n in removed.items():
            logger.warning(
                "tenant %s: removed %d key(s) written without the senders' scripts: %s", tenant, n, why
            )
        self._streams_seen = seen
        self.sweeps += 1

    async def _sweep_keys(self, names, limits: dict, uploads, seen: set[str], removed) -> None:
        """One ``SCAN`` batch of ``_sweep``."""
        ttl_ms, max_blob = limits["blob_ttl_ms"], limits["max_image_bytes"]
        found = []
        for name in names:
            tenant = self.keys.tenant_of_key(name)
            keys = self.tenant_keys.get(tenant) if tenant is not None else None
            rest = name[len(keys.namespace) :] if keys is not None else ""
            kind = next((k for k, (named, _) in _SWEPT.items() if _named(rest, named)), None)
            if keys is not None and kind is not None:
                found.append((kind, keys, name))
        if not found:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, _, name in found:
                pipe.type(name)
                pipe.pttl(name)
                pipe.strlen(name)  # an error for anything but a string: then unused
            facts = await pipe.execute(raise_on_error=False)
        doomed, expire = [], []
        for k, (kind, keys, name) in enumerate(found):
            type_, ttl, size = facts[3 * k : 3 * k + 3]
            expected = _SWEPT[kind][1]
            if type_ == "none":  # gone meanwhile
                continue
            if type_ != expected:
                doomed.append(name)
                removed[(keys.tenant, f"a {type_} where a {expected} belongs")] += 1
            elif kind == "stream":
                job = keys.job_from_stream(name)
                seen.add(name)
                if not valid_id(job):
                    doomed.append(name)
                    removed[(keys.tenant, "streams of no valid job id")] += 1
                elif name in self._streams_seen and await self._drop_unlisted(
                    keys=[keys.jobs, name], args=[job]
                ):
                    removed[(keys.tenant, "streams no job lists")] += 1
            elif kind == "upload" and int(size) > max_blob:
                doomed.append(name)
                removed[(keys.tenant, f"uploads over media.max_image_bytes ({max_blob})")] += 1
            elif kind in ("upload", "counter"):
                if int(ttl) < 0 or int(ttl) > ttl_ms:  # no TTL, or longer than uploads get
                    expire.append(name)
                    ttl = ttl_ms
                if kind == "upload":
                    uploads[keys.tenant].append((int(ttl), int(size), name))
        if doomed or expire:
            async with self.redis.pipeline(transaction=False) as pipe:
                if doomed:
                    pipe.delete(*doomed)
                for name in expire:
                    pipe.pexpire(name, ttl_ms)
                await pipe.execute()
