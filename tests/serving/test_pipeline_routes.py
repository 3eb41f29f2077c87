"""One pipeline behind every door, on the shared real server.

Content parts reach every judge kind the same way (normalised once, before any kind sees them);
the adapters' routes (``/get_reward``, ``/classify``) get the judgment cache and the metrics that
``/score`` gets; and a limit checked once in the runner (``limits.max_request_chars``) is seen on
every route and on the queue.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REDIS_URL, TEST_LIMITS

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def parts(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


def metric(client, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.mark.parametrize("judge", ["tiny-rm", "followup", "smollm2"])
def test_content_parts_score_as_their_text_on_every_kind(client, judge):
    """The same words as a string and as a list of text parts (in the response and in the chat
    messages of the prompt) get the same score, whatever the judge kind."""
    plain = {
        "judge": judge,
        "items": [
            {"prompt": [{"role": "user", "content": QUESTION}], "response": ANSWER},
            {"prompt": QUESTION, "response": ANSWER},
        ],
    }
    as_parts = {
        "judge": judge,
        "items": [
            {"prompt": [{"role": "user", "content": parts(QUESTION)}], "response": parts(ANSWER)},
            {"prompt": QUESTION, "response": [*parts("The capital of France "), *parts("is Paris.")]},
        ],
    }
    a = client.post("/score", json=plain)
    b = client.post("/score", json=as_parts)
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    for expected, result in zip(a.json()["results"], b.json()["results"], strict=True):
        assert expected["error"] is None and expected["score"] is not None, expected
        assert result["error"] is None, result
        assert result["score"] == pytest.approx(expected["score"], abs=1e-4)


def test_classify_reads_content_parts_in_messages(client):
    plain = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    as_parts = [{"role": "user", "content": parts(QUESTION)}, {"role": "assistant", "content": parts(ANSWER)}]
    a = client.post("/classify", json={"model": "tiny-rm", "messages": plain, "use_activation": False})
    b = client.post("/classify", json={"model": "tiny-rm", "messages": as_parts, "use_activation": False})
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert b.json()["data"][0]["probs"] == pytest.approx(a.json()["data"][0]["probs"], abs=1e-5)


def test_an_image_for_a_text_only_classifier_is_a_422_naming_it(client):
    tiny_png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    content = [{"type": "text", "text": QUESTION}, {"type": "image", "data": tiny_png}]
    r = client.post(
        "/classify", json={"model": "tiny-rm", "messages": [{"role": "user", "content": content}]}
    )
    assert r.status_code == 422, r.text
    assert "messages[0].content" in r.json()["message"] and "text only" in r.json()["message"]


def test_a_repeated_classify_is_answered_from_the_judgment_cache(client):
    body = {"model": "tiny-rm", "input": [f"{QUESTION} {ANSWER} (classify cache)"], "cache": True}
    hits, engine = (
        metric(client, "referee_judgment_cache_total", judge="tiny-rm", outcome="hit"),
        metric(client, "referee_engine_requests_total", judge="tiny-rm"),
    )
    items = metric(client, "referee_items_total", route="classify", judge="tiny-rm")
    first = client.post("/classify", json=body)
    again = client.post("/classify", json=body)
    assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
    assert first.json()["usage"]["cached"] == 0 and again.json()["usage"]["cached"] == 1
    assert again.json()["data"][0]["probs"] == first.json()["data"][0]["probs"]
    assert metric(client, "referee_judgment_cache_total", judge="tiny-rm", outcome="hit") - hits == 1
    assert metric(client, "referee_engine_requests_total", judge="tiny-rm") - engine == 1  # the first only
    assert metric(client, "referee_items_total", route="classify", judge="tiny-rm") - items == 2


def test_a_repeated_get_reward_is_answered_from_the_judgment_cache(client):
    body = {"query": [f"{QUESTION} {ANSWER} (get_reward cache)", "Another query to score."]}
    hits = metric(client, "referee_judgment_cache_total", judge="tiny-rm", outcome="hit")
    engine = metric(client, "referee_engine_requests_total", judge="tiny-rm")
    first = client.post("/get_reward?judge=tiny-rm&cache=true", json=body)
    again = client.post("/get_reward?judge=tiny-rm&cache=true", json=body)
    assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
    assert again.json()["rewards"] == first.json()["rewards"]
    assert metric(client, "referee_judgment_cache_total", judge="tiny-rm", outcome="hit") - hits == 2
    assert metric(client, "referee_engine_requests_total", judge="tiny-rm") - engine == 2
    # without asking, the test server's cache.default (off) holds: the engine answers again
    client.post("/get_reward?judge=tiny-rm", json=body)
    assert metric(client, "referee_engine_requests_total", judge="tiny-rm") - engine == 4


# ---------------------------------------------------------------- a limit added once, seen everywhere

# Over limits.max_request_chars together, each text under limits.max_text_chars.
_TEXT = "word " * ((TEST_LIMITS["max_text_chars"] - 100) // 5)
_COUNT = TEST_LIMITS["max_request_chars"] // len(_TEXT) + 1
assert min(TEST_LIMITS["max_items"], TEST_LIMITS["max_group_size"]) >= _COUNT

DOORS = {
    "/score": {"judge": "tiny-rm", "items": [{"prompt": QUESTION, "response": _TEXT}] * _COUNT},
    "/pairwise": {
        "items": [{"prompt": QUESTION, "response_a": _TEXT, "response_b": "Paris."}] * _COUNT,
    },
    "/judge": {"items": [{"prompt": QUESTION, "response": _TEXT}] * _COUNT},
    "/winrate": {"prompt": QUESTION, "responses": [f"{k} {_TEXT}" for k in range(_COUNT)]},
    "/classify": {"model": "tiny-rm", "input": [_TEXT] * _COUNT},
    "/get_reward?judge=tiny-rm": {"query": [_TEXT] * _COUNT},
    "/v1/chat/completions": {
        "model": "smollm2",
        "messages": [{"role": "user", "content": _TEXT}] * _COUNT,
        "max_tokens": 4,
    },
    "/verl/v1/chat/completions": {"messages": [{"role": "user", "content": _TEXT}] * _COUNT, "max_tokens": 4},
}


@pytest.mark.parametrize("door", list(DOORS))
def test_the_request_character_budget_is_checked_at_every_door(client, door):
    r = client.post(door, json=DOORS[door])
    assert r.status_code == 413, r.text[:500]
    body = r.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["message"]
    assert "limits.max_request_chars" in message


def test_the_request_character_budget_is_checked_for_queued_messages(server_url, redis_prefix):
    from referee.protocol import ScoreItem, ScoreRequest
    from referee.queue import QueueReferee

    async def send():
        async with QueueReferee(REDIS_URL, job_id="char-budget", prefix=redis_prefix) as q:
            request = ScoreRequest(
                judge="tiny-rm", items=[ScoreItem(prompt=QUESTION, response=_TEXT)] * _COUNT
            )
            rid = await q.send("score", request)
            with pytest.raises(Exception) as failed:
                await q.receive("score", rid, timeout=120)
            return failed.value

    error = asyncio.run(send())
    assert "limits.max_request_chars" in str(error)


# ---------------------------------------------------------------- the OpenAI face's bounds


def test_a_flood_of_stop_strings_is_refused_before_the_engine(client):
    """vLLM checks every stop string on every generated token in the API process: 50,000 of them
    (a 450 kB body, under every size limit) are refused at once, and the server keeps answering."""
    body = {
        "model": "smollm2",
        "prompt": "Say hi.",
        "max_tokens": 8,
        "n": 2,
        "stop": [f"s{k}" for k in range(50_000)],
    }
    before = metric(client, "referee_engine_requests_total", judge="smollm2")
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "limits.max_stop_strings" in r.json()["error"]["message"]
    assert metric(client, "referee_engine_requests_total", judge="smollm2") == before  # never reached it
    assert client.get("/healthz").status_code == 200
    ok = client.post("/v1/completions", json={**body, "stop": ["\n", "."]})
    assert ok.status_code == 200, ok.text


def test_log_probability_volume_is_bounded(client):
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say hi."}],
        "n": 64,
        "max_tokens": 256,
        "logprobs": True,
        "top_logprobs": 20,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "limits.max_logprob_entries" in r.json()["error"]["message"], r.text
