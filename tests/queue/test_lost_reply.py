"""A reply that Redis popped but the sender never received is read back from its result key.

Redis hands a reply over the moment it answers a BLPOP. If the sender's read of it is cut off (its
event loop stalled past the socket timeout, the connection dropped), the reply is gone from the
list and never reached the sender; before the result key held the answer, such a request waited
until its timeout although it had been judged (seen in ``benchmarks/fault_injection.py --only t4``,
where the attacker's image encoding stalled the senders' event loop). Real Redis; the consumer's
own reply script writes the answer.
"""

from __future__ import annotations

import uuid

import pytest
import redis as redis_sync

from referee.protocol import QueueReply, ScoreResponse, ScoreResult, Usage
from referee.queue import QueueReferee
from reward_server.consumer import _REPLY_ONCE
from tests.support import REDIS_URL


@pytest.fixture()
def prefix():
    prefix = f"referee-test-lostpop-{uuid.uuid4().hex[:6]}"
    yield prefix
    admin = redis_sync.Redis.from_url(REDIS_URL)
    stale = list(admin.scan_iter(f"{prefix}:*"))
    if stale:
        admin.delete(*stale)
    admin.close()


def _answer(admin, q: QueueReferee, rid: str, score: float) -> str:
    body = ScoreResponse(judge="j", results=[ScoreResult(index=0, score=score)], usage=Usage())
    raw = QueueReply(request_id=rid, status=200, body=body.model_dump()).model_dump_json()
    reply_once = admin.register_script(_REPLY_ONCE)
    keys = [q.keys.result(q.job_id, rid), q.keys.reply(q.job_id, rid)]
    assert reply_once(keys=keys, args=[raw, 60]) == 1
    assert reply_once(keys=keys, args=[raw, 60]) == 0  # answered once only
    return raw


async def test_an_answer_popped_but_never_received_is_read_from_the_result_key(prefix):
    admin = redis_sync.Redis.from_url(REDIS_URL, decode_responses=True)
    async with QueueReferee(REDIS_URL, job_id="job", prefix=prefix, timeout=20, lost_check_s=0.2) as q:
        rid = uuid.uuid4().hex
        raw = _answer(admin, q, rid, 0.75)
        # The BLPOP whose read was cut off: Redis popped the reply, nobody received it.
        assert admin.lpop(q.keys.reply(q.job_id, rid)) == raw
        out = await q.receive("score", rid)
        assert out.results[0].score == 0.75
        assert q.recovered == 1 and q.resent == 0
        assert q.last_reply.request_id == rid


async def test_a_reply_still_in_its_list_is_popped_not_read_from_the_result_key(prefix):
    admin = redis_sync.Redis.from_url(REDIS_URL, decode_responses=True)
    async with QueueReferee(REDIS_URL, job_id="job", prefix=prefix, timeout=20, lost_check_s=0.2) as q:
        rid = uuid.uuid4().hex
        _answer(admin, q, rid, 0.25)
        out = await q.receive("score", rid)
        assert out.results[0].score == 0.25
        assert q.recovered == 0
        # the reply list is emptied (nothing left to look like a second answer)
        assert admin.llen(q.keys.reply(q.job_id, rid)) == 0
