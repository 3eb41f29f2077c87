"""The OpenAI-compatible routes, driven by the official ``openai`` client (sync and async) against
the real server: the shared one (the embedded SmolLM2 judge) and the tenant one (keys, images)."""

from __future__ import annotations

import asyncio
import base64
import io
import math

import httpx
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture()
def oai(server_url):
    with openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def test_models_lists_the_judges(oai):
    models = {m.id: m for m in oai.models.list().data}
    assert {"smollm2", "tiny-rm"} <= set(models)
    assert models["smollm2"].owned_by == "referee"


def test_chat_completion_with_logprobs_matches_the_native_route(oai, client):
    out = oai.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert "paris" in choice.message.content.lower()
    assert out.usage.prompt_tokens > 10 and 0 < out.usage.completion_tokens <= 8
    first = choice.logprobs.content[0]
    assert len(first.top_logprobs) == 5 and first.logprob <= 0
    assert math.isclose(first.logprob, first.top_logprobs[0].logprob, abs_tol=1e-5)  # greedy: the top one
    # the judge's verdict through the native route and a chat request the OpenAI way agree: same engine
    judged = client.post(
        "/pairwise",
        json={
            "order": "single",
            "items": [{"prompt": "Capital of France?", "response_a": "Paris.", "response_b": "Lyon."}],
        },
    ).json()
    assert judged["results"][0]["verdict"] in ("A", "B", "tie")


def test_streaming_gives_the_same_text_as_one_answer(oai):
    whole = oai.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0)
    stream = oai.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish in ("stop", "length") and usage.completion_tokens == whole.usage.completion_tokens


def test_async_client_several_choices_and_text_completions(server_url):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0) as c:
            many = await c.chat.completions.create(
                model="smollm2", messages=QUESTION, max_tokens=6, temperature=1.0, n=3, seed=1
            )
            text = await c.completions.create(
                model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0
            )
            return many, text

    many, text = asyncio.run(run())
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert text.choices[0].text and text.object == "text_completion"


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"model": "nope"}, openai.NotFoundError, "/v1/models"),
        ({"model": "tiny-rm"}, openai.BadRequestError, "generative judge"),
        ({"model": "smollm2", "max_tokens": 100_000}, openai.BadRequestError, "limits.max_new_tokens"),
        (
            {"model": "smollm2", "tools": [{"type": "function", "function": {"name": "f"}}]},
            openai.BadRequestError,
            "tools",
        ),
        ({"model": "smollm2", "n": 1000}, openai.APIStatusError, "max_items"),
    ],
)
def test_errors_have_openai_shapes(oai, kwargs, error, words):
    with pytest.raises(error) as exc:
        oai.chat.completions.create(messages=QUESTION, **{"max_tokens": 4, **kwargs})
    body = exc.value.body
    assert isinstance(body, dict) and words in body["message"], body
    assert body["type"] and body["code"]


def test_a_prompt_longer_than_the_context_is_a_400_even_when_streaming(oai):
    long = [{"role": "user", "content": "word " * 3000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="engine refused"):
            out = oai.chat.completions.create(model="smollm2", messages=long, max_tokens=4, stream=stream)
            list(out) if stream else None


def test_keys_and_images_on_the_tenant_server(tenant_server):
    from PIL import Image

    bad = openai.OpenAI(base_url=f"{tenant_server.url}/v1", api_key="rk.team-a.wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(
        base_url=f"{tenant_server.url}/v1", api_key=tenant_server.keys["team-a"], max_retries=0
    )
    raw = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(raw, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(raw.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Is this red? Answer A or B."},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    out = good.chat.completions.create(
        model="tiny-vlm", messages=messages, max_tokens=1, logprobs=True, top_logprobs=3
    )
    assert out.usage.prompt_tokens > 16  # the image's tokens are in the prompt
    remote = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}]}
    ]
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        good.chat.completions.create(model="tiny-vlm", messages=remote, max_tokens=1)
    assert "not fetched" in exc.value.body["message"]
    # the text-only classifier in the same server: an OpenAI-shaped 400
    r = httpx.post(
        f"{tenant_server.url}/v1/chat/completions",
        headers=tenant_server.headers("team-a"),
        json={"model": "tiny-rm", "messages": QUESTION},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
