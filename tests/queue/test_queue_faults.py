"""The queue under faults, caused for real: Redis killed and restarted (its own throwaway
``redis-server`` per test, never the shared one), messages lost, deadlines passed, floods, shutdown.

The judge is a stand-in service (as in test_queue_policy.py): these are tests of the queue's logic,
not of judging; the serving path is tested against the real server in test_queue.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid

import httpx
import pytest
from redis.asyncio import Redis

from referee import (
    APIError,
    BacklogFull,
    Overloaded,
    QueueUnavailable,
    RefereeError,
    ScoreItem,
    ScoreRequest,
    TransportError,
    Unavailable,
)
from referee.keys import CONSUMER_GROUP, Keys
from referee.protocol import JudgesResponse, QueueMessage, ScoreResponse, ScoreResult, Usage
from referee.queue import QueueReferee
from reward_server import metrics
from reward_server.consumer import QueueConsumer
from reward_server.settings import QueueSettings
from tests.support import MAX_TRIES_IN_1_5_S, REDIS_URL, OwnRedis, Tries

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

ITEMS = [ScoreItem(prompt="q", response="r")]
FAST = {"block_ms": 20, "reclaim_every_s": 0.2, "reconnect_max_s": 0.5}


# ---------------------------------------------------------------- a Redis of the test's own


@pytest.fixture()
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture()
async def prefix():
    """A key prefix of this test's own on the shared Redis, removed afterwards."""
    value = f"referee-test-faults-{uuid.uuid4().hex[:8]}"
    yield value
    r = Redis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(f"{value}:*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


# ---------------------------------------------------------------- stand-in judges


class EchoService:
    """Ready at once; answers /score with the length of each response."""

    ready = True
    load_error = None
    fatal = None

    def __init__(self, settings=None, **wiring) -> None:
        from reward_server.health import HealthStore
        from reward_server.settings import HealthSettings

        self.calls = 0
        self.judges = {}
        self.health = HealthStore(HealthSettings())  # what the app closes at shutdown
        self.asked: list[tuple[str, str, bool]] = []  # (tenant, job, queued) of every question

    async def load(self) -> None:
        return None

    def remote_status(self) -> dict:
        return {}  # no remote judges

    def shutdown(self) -> None:
        return None

    def describe(self) -> JudgesResponse:
        return JudgesResponse(default="echo", judges=[])

    async def score(self, request, *, tenant: str, job: str, queued: bool = False) -> ScoreResponse:
        self.calls += 1
        self.asked.append((tenant, job, queued))
        results = [ScoreResult(index=i, score=len(it.response)) for i, it in enumerate(request.items)]
        return ScoreResponse(judge="echo", results=results, usage=Usage())


class SlowService(EchoService):
    """Judges until cancelled (or for ``seconds``); counts calls and cancellations."""

    def __init__(self, seconds: float = 3600.0) -> None:
        super().__init__()
        self.seconds, self.cancelled, self.started = seconds, 0, asyncio.Event()

    async def score(self, request, **context) -> ScoreResponse:
        self.calls += 1
        self.started.set()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().score(request, **context)


@contextlib.asynccontextmanager
async def consuming(service, settings: QueueSettings):
    consumer = QueueConsumer(service, settings)
    task = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        if consumer.state != "stopped":
            await consumer.stop(drain_s=1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- 1. a supervised consumer


async def test_consumer_reconnects_after_redis_restarts_and_readyz_reports_it(own_redis, monkeypatch):
    """Redis killed under a running server: /readyz turns 503 with the queue's state, the consumer
    reconnects when Redis is back, /readyz is 200 again and queued requests are answered."""
    from reward_server import app as app_module
    from reward_server.settings import ServerSettings

    monkeypatch.delenv("REFEREE_CONFIG", raising=False)
    monkeypatch.setattr(app_module, "JudgeService", EchoService)
    settings = ServerSettings(queue=QueueSettings(enabled=True, url=own_redis.url, prefix="t", **FAST))
    app = app_module.create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.app.router.lifespan_context(app.app),
        httpx.AsyncClient(transport=transport, base_url="http://app") as http,
    ):
        consumer = app.state.consumer
        await wait_for(lambda: consumer.state == "consuming", what="consuming")
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["queue"]["state"] == "consuming"
        async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=20) as q:
            assert (await q.score(items=ITEMS)).results[0].score == 1

        own_redis.kill()
        await wait_for(lambda: consumer.state == "reconnecting", what="reconnecting")
        down = await http.get("/readyz")
        assert down.status_code == 503
        assert down.json()["error"] == "queue_unavailable"
        assert down.json()["queue"]["state"] == "reconnecting"
        assert "Connection" in down.json()["queue"]["last_error"]
        await asyncio.sleep(1.0)  # several failed attempts: the consumer must keep trying
        assert not app.state.consuming.done()

        own_redis.start()
        await wait_for(lambda: consumer.state == "consuming", what="consuming again")
        assert (await http.get("/readyz")).status_code == 200
        assert consumer.reconnects >= 1
        async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=20) as q:
            assert (await q.score(items=[ScoreItem(prompt="q", response="rr")])).results[0].score == 2


async def test_readyz_is_503_when_the_consumer_task_died(own_redis, monkeypatch):
    from reward_server import app as app_module
    from reward_server.settings import ServerSettings

    monkeypatch.delenv("REFEREE_CONFIG", raising=False)
    monkeypatch.setattr(app_module, "JudgeService", EchoService)
    settings = ServerSettings(queue=QueueSettings(enabled=True, url=own_redis.url, prefix="t", **FAST))
    app = app_module.create_app(settings)
    async with (
        app.app.router.lifespan_context(app.app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http,
    ):
        await wait_for(lambda: app.state.consumer.state == "consuming", what="consuming")
        app.state.consuming.cancel()  # whatever ends the task, readiness must not stay green
        await asyncio.sleep(0.05)
        down = await http.get("/readyz")
        assert down.status_code == 503 and down.json()["queue"]["state"] == "stopped"
        assert "ended" in down.json()["queue"]["last_error"]


async def test_consumer_recreates_its_group_when_redis_comes_back_empty(own_redis):
    async with consuming(EchoService(), QueueSettings(url=own_redis.url, prefix="t", **FAST)) as consumer:
        await wait_for(lambda: consumer.state == "consuming")
        async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=20) as q:
            await q.score(items=ITEMS)
        own_redis.kill()
        own_redis.start(lose_data=True)  # no stream, no group, no jobs: all gone
        async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=20) as q:
            assert (await q.score(items=ITEMS)).results[0].score == 1
        assert consumer.state == "consuming"


# ---------------------------------------------------------------- 2. QueueReferee under faults


async def test_queue_referee_raises_its_own_error_when_redis_stays_down(own_redis, monkeypatch):
    own_redis.kill()
    async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=1.5) as q:
        sends = Tries(monkeypatch, q._redis, "evalsha")
        with pytest.raises(QueueUnavailable) as err:
            await q.score(items=ITEMS)
        # bounded by the timeout: it retried, and gave up when the next try would have been too late
        assert 1 <= sends.count <= MAX_TRIES_IN_1_5_S
        assert isinstance(err.value, TransportError) and isinstance(err.value, RefereeError)
        with pytest.raises(QueueUnavailable):
            await q.judges()
        assert await q.health() is False


async def test_queue_referee_rides_out_a_short_redis_outage(own_redis):
    """Redis down when the request is sent and back a moment later: the call just takes longer."""
    async with consuming(EchoService(), QueueSettings(url=own_redis.url, prefix="t", **FAST)) as consumer:
        await wait_for(lambda: consumer.state == "consuming")
        own_redis.kill()
        loop = asyncio.get_running_loop()
        loop.call_later(1.5, own_redis.start)
        async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=30) as q:
            assert (await q.score(items=ITEMS)).results[0].score == 1


async def test_a_message_lost_by_redis_is_sent_again_with_the_same_request_id(own_redis):
    settings = QueueSettings(url=own_redis.url, prefix="t", **FAST)
    service = EchoService()
    async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=30, lost_check_s=0.3) as q:
        rid = await q.send("score", ScoreRequest(items=ITEMS))
        own_redis.kill()
        own_redis.start(lose_data=True)  # the message is gone, and no consumer saw it
        async with consuming(service, settings):
            result = await q.receive("score", rid)
        assert result.results[0].score == 1
        assert q.resent == 1 and q.last_reply.request_id == rid
    assert service.calls == 1


async def test_a_resent_message_already_answered_is_not_judged_twice(own_redis):
    """Duplicates (a re-send racing the original) are answered once: the result key decides."""
    settings = QueueSettings(url=own_redis.url, prefix="t", per_job_inflight_messages=1, read_count=1, **FAST)
    service = EchoService()
    async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=30) as q:
        rid = await q.send("score", ScoreRequest(items=ITEMS))
        _, raw = q._sent[rid]
        await q._append(raw, rid, time.time() + 30)  # the same message twice in the stream
        async with consuming(service, settings):
            await q.receive("score", rid)
            await wait_for_async(lambda: q._redis.xlen(q.keys.stream("a")), 0)
            assert await q._redis.llen(q.keys.reply(q.job_id, rid)) == 0  # one answer, popped; no second one
    assert service.calls == 1


async def wait_for_async(fetch, expected, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := await fetch()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{value} != {expected}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- 3. deadlines


async def test_an_expired_message_is_answered_expired_without_judging(prefix):
    service = EchoService()
    async with (
        consuming(service, QueueSettings(url=REDIS_URL, prefix=prefix, **FAST)),
        QueueReferee(REDIS_URL, job_id="late", prefix=prefix, timeout=20) as q,
    ):
        rid = await q.send("score", ScoreRequest(items=ITEMS), deadline=time.time() - 1)
        with pytest.raises(Unavailable, match="deadline passed") as err:
            await q.receive("score", rid)
        assert err.value.status == 504 and err.value.code == "expired"
        await wait_for_async(lambda: q._redis.xlen(q.keys.stream("late")), 0)  # acknowledged
    assert service.calls == 0


async def test_judging_stops_when_the_deadline_passes(prefix):
    service = SlowService()
    async with (
        consuming(service, QueueSettings(url=REDIS_URL, prefix=prefix, **FAST)),
        QueueReferee(REDIS_URL, job_id="slow", prefix=prefix, timeout=20) as q,
    ):
        deadline = time.time() + 1.0
        rid = await q.send("score", ScoreRequest(items=ITEMS), deadline=deadline)
        with pytest.raises(Unavailable) as err:
            await q.receive("score", rid)
        assert err.value.code == "expired" and time.time() >= deadline  # at its deadline, not before
    # judged, then stopped at the deadline: cancelled, not left to run its hour
    assert service.calls == 1 and service.cancelled == 1


async def test_queue_referee_sets_the_deadline_from_its_timeout(prefix):
    async with QueueReferee(REDIS_URL, job_id="d", prefix=prefix, timeout=42) as q:
        await q.send("score", ScoreRequest(items=ITEMS))
        [(_, fields)] = await q._redis.xrange(q.keys.stream("d"))
        msg = QueueMessage.model_validate_json(fields["msg"])
        assert msg.deadline == pytest.approx(msg.sent_at + 42, abs=0.01)


# ---------------------------------------------------------------- 4. bounded Redis


async def test_a_sender_refuses_judges_on_another_key_layout(prefix):
    """Consumers from before key layout 2 publish limits without ``key_layout``: a sender of layout 2
    would queue where they never read, so it refuses with a message that names both layouts, unsent."""
    r = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        await r.hset(f"{prefix}:limits", mapping={"auth": 0, "max_backlog": 100})  # as layout 1 did
        async with QueueReferee(REDIS_URL, job_id="j", prefix=prefix, timeout=5) as q:
            with pytest.raises(APIError, match="key layout 1, this client with layout 2") as err:
                await q.score(items=ITEMS)
            assert err.value.status == 409 and err.value.code == "key_layout"
        assert not await r.exists(Keys(prefix).stream("j"), Keys(prefix).jobs)  # nothing queued
        # A consumer of a later layout: its copy for the tenant says so, and the send script refuses.
        await r.hset(f"{prefix}:limits", "key_layout", 3)
        await r.hset(Keys(prefix).tenant_limits, "key_layout", 3)
        async with QueueReferee(REDIS_URL, job_id="j", prefix=prefix, timeout=5) as q:
            with pytest.raises(APIError, match="key layout 3, this client with layout 2"):
                await q.score(items=ITEMS)
            q._layout_checked = True  # past the first check: the send script itself refuses
            with pytest.raises(APIError, match="key layout 3"):
                await q.score(items=ITEMS)
        assert not await r.exists(Keys(prefix).stream("j"))
        await r.delete(f"{prefix}:limits", Keys(prefix).tenant_limits)
        async with (
            consuming(EchoService(), QueueSettings(url=REDIS_URL, prefix=prefix, **FAST)),
            QueueReferee(REDIS_URL, job_id="j", prefix=prefix, timeout=20) as q,
        ):
            assert (await q.score(items=ITEMS)).results[0].score == 1
    finally:
        await r.aclose()


async def test_a_job_beyond_its_backlog_cap_gets_backlog_full(prefix):
    async with QueueReferee(REDIS_URL, job_id="flood", prefix=prefix, max_backlog=3) as q:
        for _ in range(3):
            await q.send("score", ScoreRequest(items=ITEMS))
        with pytest.raises(BacklogFull, match="cap of 3") as err:
            await q.send("score", ScoreRequest(items=ITEMS))
        assert isinstance(err.value, Overloaded)
        assert err.value.status == 429 and err.value.code == "backlog_full"
        assert await q._redis.xlen(q.keys.stream("flood")) == 3
        # The consumers' published cap wins over the sender's default.
        consumer = QueueConsumer(EchoService(), QueueSettings(url=REDIS_URL, prefix=prefix, max_backlog=5))
        await consumer._announce()
        await consumer.redis.aclose()
        for _ in range(2):
            await q.send("score", ScoreRequest(items=ITEMS))
        with pytest.raises(BacklogFull, match="cap of 5"):
            await q.send("score", ScoreRequest(items=ITEMS))


async def test_dead_letter_entries_are_cut_and_the_stream_capped(prefix):
    keys = Keys(prefix)
    r = Redis.from_url(REDIS_URL, decode_responses=True)
    await r.zadd(keys.jobs, {"junk": time.time()})
    big = json.dumps({"request_id": "rid-1", "type": "nonsense", "pad": "x" * 50_000})
    await r.xadd(keys.stream("junk"), {"msg": big})
    for i in range(250):
        await r.xadd(keys.stream("junk"), {"msg": f"not json {i}"})
    settings = QueueSettings(
        url=REDIS_URL, prefix=prefix, dead_letter_maxlen=20, dead_letter_msg_chars=100, read_count=50, **FAST
    )
    try:
        async with consuming(EchoService(), settings):
            await wait_for_async(lambda: r.xlen(keys.stream("junk")), 0, timeout=30)
        first = (await r.xrange(keys.dead_letter, count=1))[0][1]
        length = await r.xlen(keys.dead_letter)
        assert length < 251 and length <= 20 + 100  # ~: trimmed by whole nodes of 100 entries
        last = (await r.xrevrange(keys.dead_letter, count=1))[0][1]
        assert last["msg"].startswith("not json")
        every = [e for _, e in await r.xrange(keys.dead_letter)]
        assert all(len(e["msg"]) <= 100 + 40 and len(e["error"]) <= 100 for e in every)
        if first["msg"].startswith("{"):  # the big one may have been trimmed away already
            assert first["request_id"] == "rid-1" and "more characters cut" in first["msg"]
    finally:
        await r.aclose()


async def test_the_big_dead_letter_keeps_its_ids_and_loses_its_payload(prefix):
    keys = Keys(prefix)
    r = Redis.from_url(REDIS_URL, decode_responses=True)
    await r.zadd(keys.jobs, {"junk": time.time()})
    big = json.dumps({"request_id": "rid-1", "type": "nonsense", "pad": "x" * 50_000})
    await r.xadd(keys.stream("junk"), {"msg": big})
    settings = QueueSettings(url=REDIS_URL, prefix=prefix, dead_letter_msg_chars=100, **FAST)
    try:
        async with consuming(EchoService(), settings):
            await wait_for_async(lambda: r.xlen(keys.dead_letter), 1)
        entry = (await r.xrange(keys.dead_letter))[0][1]
        assert entry["request_id"] == "rid-1" and entry["job_id"] == "junk"
        assert "unreadable message" in entry["error"] and len(entry["error"]) <= 100
        assert len(entry["msg"]) < 200 and "more characters cut" in entry["msg"]
    finally:
        await r.aclose()


async def test_idle_jobs_and_dead_consumers_are_removed(prefix):
    keys = Keys(prefix)
    r = Redis.from_url(REDIS_URL, decode_responses=True)
    now = time.time()
    for job, age in (("old", 100), ("old-busy", 100), ("live", 0)):
        await r.xgroup_create(keys.stream(job), CONSUMER_GROUP, id="0", mkstream=True)
        await r.zadd(keys.jobs, {job: now - age})
    await r.xadd(keys.stream("old-busy"), {"msg": "{}"})  # not empty: kept, its messages matter
    live = keys.stream("live")
    await r.xreadgroup(CONSUMER_GROUP, "ghost", {live: ">"})  # joins, holds nothing
    await r.xadd(live, {"msg": "{}"})
    await r.xreadgroup(CONSUMER_GROUP, "holder", {live: ">"}, count=1)  # holds a pending message
    await asyncio.sleep(0.6)
    settings = QueueSettings(url=REDIS_URL, prefix=prefix, jobs_ttl_s=50, dead_consumer_idle_s=0.5)
    consumer = QueueConsumer(EchoService(), settings)
    try:
        await consumer._refresh_jobs()
        await consumer._cleanup()
        assert set(await r.zrange(keys.jobs, 0, -1)) == {"old-busy", "live"}
        assert not await r.exists(keys.stream("old")) and await r.exists(keys.stream("old-busy"))
        members = {m["name"] for m in await r.xinfo_consumers(live, CONSUMER_GROUP)}
        assert members == {"holder"}
    finally:
        await consumer.redis.aclose()
        await r.aclose()


async def test_backlog_gauge_counts_undelivered_messages_of_every_job(prefix):
    keys = Keys(prefix)
    r = Redis.from_url(REDIS_URL, decode_responses=True)
    for job, n in (("a", 2), ("b", 3)):
        await r.xgroup_create(keys.stream(job), CONSUMER_GROUP, id="0", mkstream=True)
        await r.zadd(keys.jobs, {job: time.time()})
        for _ in range(n):
            await r.xadd(keys.stream(job), {"msg": "{}"})
    await r.xreadgroup(CONSUMER_GROUP, "busy", {keys.stream("b"): ">"}, count=1)  # delivered: not backlog
    consumer = QueueConsumer(EchoService(), QueueSettings(url=REDIS_URL, prefix=prefix))
    try:
        await consumer._refresh_jobs()
        await consumer._measure_backlog()
        assert consumer.backlog == 4 and metrics.QUEUE_BACKLOG._value.get() == 4
    finally:
        await consumer.redis.aclose()
        await r.aclose()


# ---------------------------------------------------------------- 5. graceful shutdown


async def test_stop_hands_back_unfinished_messages_without_costing_a_delivery(prefix):
    """A replica stopped mid-judgement: it reads nothing more, cancels what it cannot finish within
    its grace period, and another replica takes those over at once, at the same delivery count."""
    keys = Keys(prefix)
    slow = SlowService()
    settings = QueueSettings(url=REDIS_URL, prefix=prefix, reclaim_idle_s=60, consumer_name="a", **FAST)
    async with QueueReferee(REDIS_URL, job_id="j", prefix=prefix, timeout=30) as q:
        async with consuming(slow, settings) as a:
            first = await q.send("score", ScoreRequest(items=ITEMS))
            await asyncio.wait_for(slow.started.wait(), 10)
            stopping = asyncio.create_task(a.stop(drain_s=1.5))
            await wait_for(lambda: a._runner.done(), timeout=0.5, what="reading to stop")  # at once
            second = await q.send("score", ScoreRequest(items=ITEMS))  # sent while it drains
            await stopping
            assert slow.cancelled == 1 and slow.calls == 1
        pending = await q._redis.xpending_range(keys.stream("j"), CONSUMER_GROUP, "-", "+", 10)
        assert len(pending) == 1  # only the first: the second was never read
        assert pending[0]["times_delivered"] == 0 and pending[0]["time_since_delivered"] > 60_000
        fast = EchoService()
        settings_b = settings.model_copy(update={"consumer_name": "b"})
        reclaimed = metrics.QUEUE_RECLAIMED._value.get()
        async with consuming(fast, settings_b):
            # Handed back idle past reclaim_idle_s (above): b takes it over on its first reclaim, not
            # after reclaim_idle_s (60 s, six times these receive timeouts, which only guard the wait).
            await q.receive("score", first, timeout=10)
            assert q.last_reply.attempts == 1 and q.last_reply.served_by == "b"
            await q.receive("score", second, timeout=10)
        assert fast.calls == 2
        assert metrics.QUEUE_RECLAIMED._value.get() - reclaimed == 1  # the first, reclaimed; the second read


async def test_stop_reading_from_a_signal_handler_stops_reads(prefix):
    async with consuming(EchoService(), QueueSettings(url=REDIS_URL, prefix=prefix, **FAST)) as consumer:
        await wait_for(lambda: consumer.state == "consuming")
        consumer.stop_reading()
        await asyncio.sleep(0.3)
        async with QueueReferee(REDIS_URL, job_id="s", prefix=prefix, timeout=2) as q:
            rid = await q.send("score", ScoreRequest(items=ITEMS))
            await asyncio.sleep(0.5)
            assert not await q._redis.exists(q.keys.reply(q.job_id, rid))


async def test_sigterm_stops_the_consumer_reading_before_the_server_drains(own_redis, monkeypatch):
    """Under uvicorn, the lifespan's shutdown (and so ``consumer.stop()``) starts only after HTTP
    requests have drained; SIGTERM itself must stop the reads, and still reach the server."""
    import signal

    from reward_server import app as app_module
    from reward_server.settings import ServerSettings

    received = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: received.append(sig))  # "uvicorn's"
    monkeypatch.delenv("REFEREE_CONFIG", raising=False)
    monkeypatch.setattr(app_module, "JudgeService", EchoService)
    settings = ServerSettings(queue=QueueSettings(enabled=True, url=own_redis.url, prefix="t", **FAST))
    app = app_module.create_app(settings)
    try:
        async with app.app.router.lifespan_context(app.app):
            consumer = app.state.consumer
            await wait_for(lambda: consumer.state == "consuming", what="consuming")
            signal.raise_signal(signal.SIGTERM)
            await wait_for(lambda: app.state.consuming.done(), timeout=2, what="reads to stop")
            assert received == [signal.SIGTERM] and consumer.state == "draining"
            async with QueueReferee(own_redis.url, job_id="a", prefix="t", timeout=2) as q:
                rid = await q.send("score", ScoreRequest(items=ITEMS))
                await asyncio.sleep(0.3)
                assert not await q._redis.exists(q.keys.reply(q.job_id, rid))  # not read, not answered
        assert consumer.state == "stopped"
        assert signal.getsignal(signal.SIGTERM) is not None and received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
