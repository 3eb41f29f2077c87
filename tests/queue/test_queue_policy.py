"""The consumer's retry and dead-letter policy, on the real Redis.

The judge here is a stand-in service whose every call raises: a narrow test of the queue's failure
handling (the serving path is tested against the real server in test_queue.py).
"""

import asyncio
import json
import uuid

import pytest

from referee import ScoreItem, ScoreRequest, Unavailable
from referee.protocol import JudgesResponse
from referee.queue import QueueReferee
from reward_server.consumer import QueueConsumer
from reward_server.settings import QueueSettings
from tests.support import REDIS_URL


class BrokenService:
    """Ready, but every question fails with an unexpected error."""

    ready = True
    load_error = None

    def __init__(self) -> None:
        self.calls = 0

    def describe(self) -> JudgesResponse:
        return JudgesResponse(default="broken", judges=[])

    async def score(self, request, *, tenant: str, job: str, queued: bool = False):
        assert queued  # the consumer asks as a queued question: fair admission, no 429
        self.calls += 1
        raise RuntimeError("the engine died")


@pytest.fixture()
async def consumer_prefix():
    from redis.asyncio import Redis

    prefix = f"referee-test-policy-{uuid.uuid4().hex[:8]}"
    yield prefix
    r = Redis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(f"{prefix}:*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


async def test_repeated_failure_goes_to_dead_letter_and_the_sender_gets_an_error(consumer_prefix):
    settings = QueueSettings(
        url=REDIS_URL,
        prefix=consumer_prefix,
        reclaim_idle_s=0.3,
        reclaim_every_s=0.1,
        max_deliveries=3,
        block_ms=20,
    )
    service = BrokenService()
    consumer = QueueConsumer(service, settings)
    running = asyncio.create_task(consumer.run())
    try:
        async with QueueReferee(REDIS_URL, job_id="poison", prefix=consumer_prefix, timeout=30) as q:
            with pytest.raises(Unavailable, match="the engine died") as err:
                await q.score(items=[ScoreItem(prompt="q", response="r")])
            assert err.value.status == 500 and err.value.code == "dead_letter"
            assert q.last_reply.attempts == 3
            dead = await q._redis.xrange(q.keys.dead_letter)
            assert len(dead) == 1
            entry = dead[0][1]
            assert entry["job_id"] == "poison" and entry["deliveries"] == "3"
            assert "RuntimeError: the engine died" in entry["error"]
            assert json.loads(entry["msg"])["type"] == "score"
            assert await q._redis.xlen(q.keys.stream("poison")) == 0
    finally:
        await consumer.stop(drain_s=1)
        running.cancel()
    assert service.calls == 3  # each delivery tried once, then no more


async def test_message_whose_consumers_keep_dying_is_dead_lettered_unjudged(consumer_prefix):
    """A message delivered max_deliveries times without an answer is not tried again."""
    import time

    from redis.asyncio import Redis

    from referee.keys import CONSUMER_GROUP, Keys
    from referee.protocol import QueueMessage, ScoreRequest

    keys, job = Keys(consumer_prefix), "crashy"
    r = Redis.from_url(REDIS_URL, decode_responses=True)
    msg = QueueMessage(
        type="score",
        job_id=job,
        request_id=uuid.uuid4().hex,
        sent_at=time.time(),
        body=ScoreRequest(items=[ScoreItem(prompt="q", response="r")]).model_dump(),
    )
    await r.xgroup_create(keys.stream(job), CONSUMER_GROUP, id="0", mkstream=True)
    entry = await r.xadd(keys.stream(job), {"msg": msg.model_dump_json()})
    await r.zadd(keys.jobs, {job: time.time()})
    await r.xreadgroup(CONSUMER_GROUP, "ghost", {keys.stream(job): ">"})  # delivery 1: the ghost dies
    for _ in range(2):  # two more consumers take it over and die too
        await r.xclaim(keys.stream(job), CONSUMER_GROUP, "ghost", 0, [entry])
    service = BrokenService()
    settings = QueueSettings(
        url=REDIS_URL,
        prefix=consumer_prefix,
        reclaim_idle_s=0.2,
        reclaim_every_s=0.1,
        max_deliveries=3,
        block_ms=20,
    )
    consumer = QueueConsumer(service, settings)
    running = asyncio.create_task(consumer.run())
    try:
        async with QueueReferee(REDIS_URL, job_id=job, prefix=consumer_prefix) as q:
            with pytest.raises(Unavailable, match="delivered 4 times"):
                await q.receive("score", msg.request_id, timeout=20)
    finally:
        await consumer.stop(drain_s=1)
        running.cancel()
        await r.aclose()
    assert service.calls == 0


class CountingService:
    """Ready; answers /score with zeros and counts the questions it was asked."""

    ready = True
    load_error = None

    def __init__(self) -> None:
        self.asked: list[str] = []

    def describe(self) -> JudgesResponse:
        return JudgesResponse(default="count", judges=[])

    async def score(self, request, *, tenant: str, job: str, queued: bool = False):
        from referee.protocol import ScoreResponse, ScoreResult, Usage

        self.asked.append(job)
        results = [ScoreResult(index=i, score=0.0) for i in range(len(request.items))]
        return ScoreResponse(judge="count", results=results, usage=Usage())


async def test_a_live_job_is_read_before_the_tenants_many_idle_ones(consumer_prefix):
    """A tenant with 60 idle jobs (listed, their streams empty) and one that sends: the sender's
    message is read at the first read after the consumer sees the send, not once the read window
    (room for 16 streams) has come round to its stream (up to 45 reads later)."""
    settings = QueueSettings(url=REDIS_URL, prefix=consumer_prefix, block_ms=1)
    service = CountingService()
    consumer = QueueConsumer(service, settings)
    consumer.send_clock_margin_s = 0.0  # sender and consumer share this machine's clock
    async with QueueReferee(REDIS_URL, job_id="live", prefix=consumer_prefix, timeout=30) as q:
        for k in range(60):  # idle jobs: each sent one message, answered long ago
            idle = QueueReferee(REDIS_URL, job_id=f"idle-{k:02d}", prefix=consumer_prefix, timeout=30)
            async with idle:
                await idle.send("score", ScoreRequest(items=[ScoreItem(prompt="q", response="r")]))
        await consumer._connect()
        try:
            for _ in range(200):  # every idle job's message read, then every stream read empty
                await consumer._read()
                if len(service.asked) == 60 and not consumer._tasks:
                    break
                await asyncio.sleep(0.01)
            for _ in range(80):  # the window comes round every stream: each is read empty once
                await consumer._read()
            assert len(service.asked) == 60
            await q.send("score", ScoreRequest(items=[ScoreItem(prompt="q", response="live")]))
            await consumer._refresh_jobs()
            live, reads = q.keys.stream("live"), 0
            consumer._turn = 0  # the window's next turn starts past the live job (listed first, newest)

            def taken() -> bool:
                return bool(consumer._inflight.get(live)) or "live" in service.asked

            while not taken() and reads < 100:
                await consumer._read()
                reads += 1
            assert taken() and reads == 1, reads
        finally:
            await consumer.stop(drain_s=1)
