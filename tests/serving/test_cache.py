"""The judgment cache: exact repeats answered without the engine, bit-identical to judging afresh,
never shared across judges, options or tenants, on the real servers. Its logic is checked as a unit
in ``tests/unit/test_cache.py``."""

from __future__ import annotations

import base64
import io
import uuid

import httpx
import pytest
import redis

from tests.support import RECOMPUTE_TOLERANCE, served_dtype

# ------------------------------------------------------------------ through the server


def nonce() -> str:
    return uuid.uuid4().hex[:8]


def pairwise(client, prompt: str, **options) -> dict:
    body = {
        "order": "both",
        "cache": True,
        "items": [{"prompt": prompt, "response_a": "Paris.", "response_b": "Lyon."}],
    }
    r = client.post("/pairwise", json={**body, **options})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_repeat_is_answered_by_the_cache_and_equals_judging_afresh(client):
    prompt = f"What is the capital of France? ({nonce()})"
    first = pairwise(client, prompt)
    again = pairwise(client, prompt)
    fresh = pairwise(client, prompt, cache=False)
    default = pairwise(client, prompt, cache=None)  # the test servers' cache.default is off
    assert default["usage"]["cached"] == 0
    assert first["usage"]["engine_requests"] == 2 and first["usage"]["cached"] == 0
    assert again["usage"]["engine_requests"] == 0 and again["usage"]["cached"] == 2
    assert fresh["usage"]["engine_requests"] == 2 and fresh["usage"]["cached"] == 0
    assert again["results"] == first["results"]  # bit-identical: the stored answer
    # judged afresh: the engine's own answer again, to the precision the engine repeats itself
    tolerance = RECOMPUTE_TOLERANCE[served_dtype(client, "smollm2")]
    for got, want in zip(fresh["results"], first["results"], strict=True):
        assert got["verdict"] == want["verdict"] and got["consistent"] == want["consistent"]
        assert got["p_a"] == pytest.approx(want["p_a"], abs=tolerance)
        assert got["label_mass"] == pytest.approx(want["label_mass"], abs=tolerance)
    # other options are other questions: a rubric changes the prompt, so nothing is reused
    other = pairwise(client, prompt, rubric="Prefer short answers.")
    assert other["usage"]["cached"] == 0 and other["usage"]["engine_requests"] == 2
    metrics = client.get("/metrics").text
    assert 'referee_judgment_cache_total{judge="smollm2",outcome="hit"}' in metrics


def test_duplicates_in_a_group_are_judged_once(client):
    prompt = f"Name a primary colour. ({nonce()})"
    body = {"prompt": prompt, "responses": ["Red.", "Blue.", "Red."], "order": "both", "cache": True}
    r = client.post("/winrate", json=body)
    body = r.json()
    assert r.status_code == 200, body
    # pairs (0,1), (1,2), (0,2): (0,2) is a tie without the judge; (1,2) is (0,1) again, from the cache
    assert (body["usage"]["engine_requests"], body["usage"]["cached"]) == (2, 2), body
    assert body["win_matrix"][0][2] == 0.5 and body["win_matrix"][0][1] == body["win_matrix"][2][1]
    assert body["win_rates"][0] == body["win_rates"][2]


def test_answers_are_shared_through_redis(client, redis_prefix):
    prompt = f"2+2? ({nonce()})"
    client.post(
        "/score", json={"judge": "tiny-rm", "cache": True, "items": [{"prompt": prompt, "response": "4"}]}
    )
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        assert list(r.scan_iter(f"{redis_prefix}:cache:anonymous:*", count=10_000))
    finally:
        r.close()


def test_tenants_never_share_answers(tenant_server):
    body = {"cache": True, "items": [{"prompt": f"q {nonce()}", "response": "an answer"}]}

    def score(team: str) -> dict:
        r = httpx.post(
            f"{tenant_server.url}/score", json=body, headers=tenant_server.headers(team), timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()

    a1, b1, a2 = score("team-a"), score("team-b"), score("team-a")
    assert (a1["usage"]["cached"], b1["usage"]["cached"], a2["usage"]["cached"]) == (0, 0, 1)
    assert a1["results"] == b1["results"] == a2["results"]


def test_an_uploaded_image_and_the_same_file_inline_share_answers(tenant_server):
    from PIL import Image

    raw = io.BytesIO()
    Image.new("RGB", (40, 30), (int(uuid.uuid4().int % 255), 90, 10)).save(raw, format="PNG")
    raw = raw.getvalue()
    headers = tenant_server.headers("team-c")
    with httpx.Client(base_url=tenant_server.url, headers=headers, timeout=120) as http:
        blob = http.post("/blobs", content=raw).json()["id"]

        def ask(image: dict) -> dict:
            item = {"prompt": "A red picture?", "response_a": [image], "response_b": "no picture"}
            body = {"judge": "tiny-vlm", "order": "single", "cache": True, "items": [item]}
            r = http.post("/pairwise", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        inline = ask({"type": "image", "data": base64.b64encode(raw).decode()})
        by_ref = ask({"type": "image", "blob": blob})
    assert inline["usage"]["cached"] == 0 and by_ref["usage"]["cached"] == 1
    assert by_ref["results"] == inline["results"]
