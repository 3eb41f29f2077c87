"""Client mistakes get a 4xx JSON error that says what to change, never a 500."""

import pytest

ITEM = {"prompt": "q", "response_a": "a", "response_b": "b"}
ITEM_SCORE = {"prompt": "q", "response": "r"}


@pytest.mark.parametrize(
    ("route", "body", "status", "code", "says"),
    [
        ("/pairwise", {"items": [{"prompt": "q", "response_a": "a"}]}, 422, "invalid_request", "response_b"),
        ("/pairwise", {"items": []}, 422, "invalid_request", "at least 1"),
        ("/pairwise", {"items": [ITEM], "order": "sideways"}, 422, "invalid_request", "order"),
        ("/pairwise", {"items": [ITEM], "temprature": 0.5}, 422, "invalid_request", "temprature"),
        ("/winrate", {"prompt": "q", "responses": ["only one"]}, 422, "invalid_request", "responses"),
        (
            "/judge",
            {"items": [{"prompt": "q", "response": "r", "response_a": "a", "response_b": "b"}]},
            422,
            "invalid_request",
            "either",
        ),
        (
            "/score",
            {"items": [{"prompt": [{"role": "robot", "content": "x"}], "response": "r"}]},
            422,
            "invalid_request",
            "role",
        ),
        ("/pairwise", {"judge": "nope", "items": [ITEM]}, 404, "unknown_judge", "smollm2"),
        ("/winrate", {"judge": "nope", "prompt": "q", "responses": ["a", "b"]}, 404, "unknown_judge", "nope"),
        ("/pairwise", {"judge": "tiny-rm", "mode": "cot", "items": [ITEM]}, 400, "unsupported", "generative"),
        (
            "/winrate",
            {"judge": "tiny-rm", "mode": "cot", "prompt": "q", "responses": ["a", "b"]},
            400,
            "unsupported",
            "cot",
        ),
        (
            "/judge",
            {"judge": "tiny-rm", "items": [{"prompt": "q", "response": "r"}]},
            400,
            "unsupported",
            "classifier",
        ),
        ("/pairwise", {"items": [ITEM] * 65}, 413, "too_large", "max_items"),
        (
            "/score",
            {"items": [{"prompt": "q", "response": "x" * 20_001}]},
            413,
            "too_large",
            "max_text_chars",
        ),
        ("/winrate", {"prompt": "q", "responses": ["a"] * 17}, 413, "too_large", "max_group_size"),
        (
            "/pairwise",
            {"items": [ITEM], "mode": "cot", "max_new_tokens": 10_000},
            413,
            "too_large",
            "max_new_tokens",
        ),
        ("/pairwise", {"items": [ITEM], "mode": "cot", "max_retries": 50}, 400, "bad_request", "max_retries"),
        (
            "/winrate",
            {"prompt": "q", "responses": ["a"] * 16, "order": "both", "mode": "cot"},
            413,
            "too_large",
            "max_inflight",
        ),
        # Worst-case cost counts retries: 120 pairs x 2 orders x 3 attempts = 720 > 400.
        (
            "/winrate",
            {"prompt": "q", "responses": ["a"] * 16, "order": "both", "mode": "cot", "max_retries": 2},
            413,
            "too_large",
            "max_request_cost",
        ),
        ("/score", {"items": [ITEM_SCORE], "rubric": "r" * 20_001}, 413, "too_large", "rubric"),
        (
            "/score",
            {"items": [{"prompt": [{"role": "user", "content": "hi"}] * 65, "response": "r"}]},
            413,
            "too_large",
            "max_messages",
        ),
        ("/pairwise", {"items": [ITEM], "order": "random", "seed": 2**64}, 422, "invalid_request", "seed"),
        ("/judge", {"items": [{"prompt": "q", "response": "r"}], "seed": -1}, 422, "invalid_request", "seed"),
    ],
)
def test_client_mistakes(client, route, body, status, code, says):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] == code
    assert says in err["message"]


def test_malformed_json_is_422(client):
    r = client.post("/pairwise", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["message"]


def test_wrong_method_and_path_are_4xx(client):
    assert client.get("/pairwise").status_code == 405
    assert client.post("/nowhere", json={}).status_code == 404
    assert client.get("/pairwise").json()["error"] == "method_not_allowed"
    assert set(client.post("/nowhere", json={}).json()) == {"error", "message"}


def test_a_body_that_cannot_be_parsed_gets_the_same_error_shape(client):
    # A multipart body on a JSON route: Starlette's body parsing fails with a 400 of its own.
    r = client.post("/score", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error", "message"}, r.text


def test_seeded_sampling_of_a_long_prompt_does_not_kill_the_engine(client):
    """A seeded, sampled generation whose prompt is prefilled over several engine steps (here longer
    than the test server's 256-token steps): vLLM's CPU model runner rewinds a seeded request's
    generator for the token it discards after a partial prefill, and a CPU torch.Generator has no
    offset to rewind, which killed the engine core and with it every tenant's requests. A cot
    retry samples with the request's seed; so does the OpenAI face."""
    long = "The quick brown fox jumps over the lazy dog. " * 60  # about 600 tokens
    item = {"prompt": "Which is better?", "response_a": long, "response_b": long + " Indeed."}
    r = client.post(
        "/pairwise",
        json={
            "items": [item],
            "mode": "cot",
            "order": "single",
            "max_new_tokens": 4,
            "max_retries": 1,
            "seed": 7,
            "cache": False,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["error"]  # 4 tokens cannot end with a verdict: invalid, reported
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": long}],
            "max_tokens": 4,
            "temperature": 0.9,
            "seed": 3,
            "n": 2,
        },
    )
    assert chat.status_code == 200, chat.text
    assert client.get("/readyz").status_code == 200  # the engine is alive
    again = client.post("/score", json={"items": [{"prompt": "Hi", "response": "Hello."}]})
    assert again.status_code == 200 and again.json()["results"][0]["score"] is not None
