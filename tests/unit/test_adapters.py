"""The SDK's retries without a server: a 429 is retried after its Retry-After with one idempotency
key. The drop-in shapes against the real server are in ``tests/serving/test_adapters.py``."""

import httpx
import pytest

from referee import Overloaded, Referee, RetryPolicy


def test_sdk_retries_429_honouring_retry_after_with_one_idempotency_key():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Idempotency-Key"])
        if len(seen) < 3:
            return httpx.Response(
                429, headers={"Retry-After": "0.05"}, json={"error": "overloaded", "message": "busy"}
            )
        return httpx.Response(200, json={"default": "j", "judges": []})

    with Referee("http://referee", transport=httpx.MockTransport(handler)) as ref:
        assert ref.judges().default == "j"
    assert len(seen) == 3 and len(set(seen)) == 1
    with (
        Referee(
            "http://referee",
            retry=RetryPolicy(attempts=2, backoff=0.01),
            transport=httpx.MockTransport(
                lambda r: httpx.Response(429, json={"error": "overloaded", "message": "busy"})
            ),
        ) as ref,
        pytest.raises(Overloaded),
    ):
        ref.judges()
