"""The queue's wire models without Redis. The queue against the real Redis and the real server's
consumer is in ``tests/queue/``."""

from referee.protocol import QueueReply


def test_reply_model_round_trips():
    reply = QueueReply(request_id="r", status=200, body={"x": 1}, attempts=2, served_by="c")
    assert QueueReply.model_validate_json(reply.model_dump_json()) == reply
