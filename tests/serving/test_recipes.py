"""The recipes in docs/, run against the real servers, and the judge requests of trainers whose
client code cannot be installed here, sent with exactly their shape.

A docs page marks each Python block that runs here with an HTML comment just before it:
``<!-- tested -->``, or ``<!-- tested requires=MODULE -->`` for a block that needs a package this
environment may lack (skipped, saying so, where it is missing). A block starts with its settings
as constants, ``URL = "..."`` (the server), ``RM = "..."`` and ``JUDGE = "..."`` (judge names), and
the tests set them as a reader would, to the test server's URL and judges, then check what the
block computed. Sources of the request shapes are named where they are used; only the shapes
(fields, and what the caller reads back) are taken from them.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion

from tests.support import snippet, snippets

QUESTION = "What is the capital of France?"


@pytest.fixture()
def open_settings(server_url, monkeypatch) -> dict[str, str]:
    """The shared (open) server: ``smollm2`` is generative, ``tiny-rm`` a classifier."""
    monkeypatch.delenv("REFEREE_API_KEY", raising=False)
    return {"URL": server_url, "RM": "tiny-rm", "JUDGE": "smollm2"}


def direct_win_rates(client, prompt, responses) -> list[float]:
    out = client.post("/winrate", json={"judge": "tiny-rm", "prompt": prompt, "responses": responses})
    assert out.status_code == 200, out.text
    return out.json()["win_rates"]


def direct_scores(client, judge, prompt, responses) -> list[float]:
    items = [{"prompt": prompt, "response": r} for r in responses]
    out = client.post("/score", json={"judge": judge, "items": items})
    assert out.status_code == 200, out.text
    return [r["score"] for r in out.json()["results"]]


def test_trl_recipe(open_settings, client):
    rewards = snippet("trl").run(**open_settings)["rewards"]
    assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)
    assert sum(rewards) == pytest.approx(1.5)
    chat = [{"role": "user", "content": QUESTION}]
    assert rewards == pytest.approx(direct_win_rates(client, chat, ["Paris.", "Lyon.", "It is Paris."]))


def test_openrlhf_recipe(open_settings, client):
    namespace = snippet("openrlhf").run(**open_settings)
    answer = namespace["answer"].json()
    assert len(answer["rewards"]) == 1 and answer["scores"] == answer["rewards"]
    # a classifier reads the query as OpenRLHF formatted it: the raw logit of the whole text
    raw = client.post(
        "/classify", json={"model": "tiny-rm", "input": namespace["body"]["query"], "use_activation": False}
    ).json()
    assert answer["rewards"][0] == pytest.approx(raw["data"][0]["probs"][0], abs=1e-5)


def test_verl_reward_loop_recipe(open_settings, client):
    compute_score = snippet("verl", 0).run(**open_settings)["compute_score"]
    responses = ["Paris.", "Lyon.", "It is Paris."]

    async def reward_loop(texts):
        # as verl's NaiveRewardManager.run_single calls it (reward_manager/naive.py): one sample a
        # call, by keyword, with reward_router_address and reward_model_tokenizer when verl runs a
        # reward model of its own
        return await asyncio.gather(
            *[
                compute_score(
                    data_source="demo",
                    solution_str=t,
                    ground_truth="Paris",
                    extra_info={"question": QUESTION, "num_turns": None},
                    reward_router_address="10.0.0.1:9000",
                    reward_model_tokenizer=None,
                )
                for t in texts
            ]
        )

    scores = asyncio.run(reward_loop(responses))
    assert all(1.0 <= s <= 9.0 for s in scores)  # the generative judge's expected rating
    assert scores == pytest.approx(direct_scores(client, "smollm2", QUESTION, responses), abs=1e-4)
    with pytest.raises(RuntimeError, match="could not score a demo response"):
        asyncio.run(reward_loop(["word " * 3000]))  # longer than the judge's context


def test_verl_batch_recipe(open_settings, client):
    scores = snippet("verl", 1).run(**open_settings)["scores"]
    assert sum(scores) == pytest.approx(1.5)
    assert scores == pytest.approx(direct_win_rates(client, QUESTION, ["Paris.", "Lyon.", "It is Paris."]))


def test_slime_recipes(open_settings, client):
    reward = snippet("slime", 0).run(**open_settings)["reward"]
    assert isinstance(reward, float)
    assert reward == pytest.approx(direct_scores(client, "tiny-rm", QUESTION, ["Paris."])[0], abs=1e-6)
    namespace = snippet("slime", 1).run(**open_settings)
    rates = namespace["rates"]
    assert sum(rates) == pytest.approx(1.5)
    assert rates == pytest.approx(direct_win_rates(client, namespace["prompt"], namespace["responses"]))


def test_openai_recipe(open_settings):
    namespace = snippet("openai").run(**open_settings)
    answer, p_yes = namespace["answer"], namespace["p_yes"]
    assert answer.model == "smollm2" and isinstance(answer.choices[0].message.content, str)
    assert len(namespace["top"]) == 10 and 0.0 <= p_yes <= 1.0
    assert "smollm2" in {m.id for m in namespace["judge"].models.list().data}
    namespace["judge"].close()


@pytest.mark.parametrize("index", range(len(snippets("verifiers"))))
def test_verifiers_recipes(open_settings, index):
    """verifiers' own judge code, unmodified, where it is installed. It is not in this environment:
    verifiers 0.4 pins ``openai<3`` and ``mcp==2.0.0`` (0.3: ``mcp<2``), and installing it would
    downgrade the ``openai`` and ``mcp`` the rest of the suite runs; the request shapes it sends
    are checked below (``test_verifiers_request_shapes``) whatever is installed."""
    s = snippet("verifiers", index)
    pytest.importorskip(s.requires, reason=f"{s.where} needs {s.requires}, not installed here")
    namespace = s.run(**open_settings)
    if "result" in namespace:  # verifiers.v1: Judge.evaluate
        result = namespace["result"]
        assert isinstance(result.text, str) and result.parsed == result.text
        assert result.usage.prompt_tokens > 10 and 0 < result.usage.completion_tokens <= 8
    else:  # JudgeRubric.judge (verifiers 0.3 and earlier)
        assert isinstance(namespace["verdict"], str) and namespace["verdict"]


def test_recipes_with_keys(tenant_server, monkeypatch):
    """The keyed forms the pages give: ``REFEREE_API_KEY`` (the SDK and the OpenAI client send it as
    ``Authorization: Bearer``), and the ``/k/<key>/`` path for clients that send no headers."""
    key = tenant_server.keys["team-a"]
    path_form = {"URL": f"{tenant_server.url}/k/{key}", "RM": "tiny-rm", "JUDGE": "tiny-vlm"}
    monkeypatch.delenv("REFEREE_API_KEY", raising=False)
    answer = snippet("openrlhf").run(**path_form)["answer"]
    assert answer.status_code == 200 and len(answer.json()["rewards"]) == 1
    assert isinstance(snippet("slime", 0).run(**path_form)["reward"], float)

    with_env = {**path_form, "URL": tenant_server.url}
    monkeypatch.setenv("REFEREE_API_KEY", key)
    assert sum(snippet("trl").run(**with_env)["rewards"]) == pytest.approx(1.5)
    namespace = snippet("openai").run(**with_env)
    assert namespace["answer"].model == "tiny-vlm" and 0.0 <= namespace["p_yes"] <= 1.0
    namespace["judge"].close()
    monkeypatch.setenv("REFEREE_API_KEY", "rk.team-a.not-a-key")
    with pytest.raises(openai.AuthenticationError):
        snippet("openai").run(**with_env)


# ---------------------------------------------------------------- request shapes: verl


# verl's GenRM prompt (a rating asked for as a bare number), as in its reward-loop test.
GRM_PROMPT = (
    "You are given a problem and a proposed solution.\n\nProblem:\nWhat is 12 * 12?\n\nSolution:\n144\n\n"
    "Please evaluate how well the solution addresses the problem. Give a score from 1 to 10. "
    "Only output the score as a single number (integer)."
)


def test_verl_genrm_request_shapes(server_url):
    """verl's reward loop gives a GenRM reward function ``reward_router_address`` (host:port) and the
    function posts to ``http://{reward_router_address}/v1/chat/completions``, reading the answer as
    ``ChatCompletion(**output).choices[0].message.content`` (verl ``tests/experimental/reward_loop/
    reward_fn.py``, ``compute_score_gsm8k`` and ``chat_complete``; ``docs/advance/reward_loop.rst``)."""
    address = server_url.removeprefix("http://")  # what +reward_kwargs.reward_router_address=... gives
    messages = [{"role": "user", "content": GRM_PROMPT}]
    # compute_score_gsm8k's body: messages, model (a model path there; a judge name here), and
    # temperature 0.7, top_p 0.8, max_tokens (4096 there)
    body = {"messages": messages, "model": "smollm2", "temperature": 0.7, "top_p": 0.8, "max_tokens": 16}
    with httpx.Client(timeout=300) as http:
        out = http.post(f"http://{address}/v1/chat/completions", json=body)
        completion = ChatCompletion(**out.json())
        assert isinstance(completion.choices[0].message.content, str)
        assert (
            completion.choices[0].finish_reason in ("stop", "length")
            and completion.usage.completion_tokens <= 16
        )

        # their max_tokens of 4096 is over this server's limits.max_new_tokens: a 400 naming the
        # limit, and verl's parsing of the error body raises (loud, never a score of 0)
        over = http.post(f"http://{address}/v1/chat/completions", json={**body, "max_tokens": 4096})
        assert over.status_code == 400 and "limits.max_new_tokens" in over.json()["error"]["message"]
        with pytest.raises(pydantic.ValidationError):
            ChatCompletion(**over.json())

        # verl's docs example sends no "model" (vLLM then takes its only model); /v1 needs one
        bare = {k: v for k, v in body.items() if k != "model"}
        missing = http.post(f"http://{address}/v1/chat/completions", json=bare)
        assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]

        # verl-recipe genrm_remote/reward_function.py (get_response, post_request): only model and
        # messages, read as output["choices"][0]["message"]["content"]
        out = http.post(f"{server_url}/v1/chat/completions", json={"model": "smollm2", "messages": messages})
        assert out.status_code == 200, out.text
        assert isinstance(out.json()["choices"][0]["message"]["content"], str)
        assert 0 < out.json()["usage"]["completion_tokens"] <= 256  # referee's default max_tokens here


def test_verl_route_takes_requests_without_a_model(server_url):
    """verl's docs example, no ``model``, with ``reward_router_address=host:port/verl``
    (``reward_server.verl_api``): the default judge answers, as vLLM's only model would."""
    body = {"messages": [{"role": "user", "content": GRM_PROMPT}], "temperature": 0.7, "top_p": 0.8}
    address = server_url.removeprefix("http://") + "/verl"
    with httpx.Client(timeout=300) as http:
        out = http.post(f"http://{address}/v1/chat/completions", json={**body, "max_tokens": 16})
        assert out.status_code == 200, out.text
        completion = ChatCompletion(**out.json())
        assert completion.model == "smollm2" and isinstance(completion.choices[0].message.content, str)
        named = http.post(f"http://{address}/v1/chat/completions", json={**body, "model": "tiny-rm"})
        assert named.status_code == 400 and named.json()["error"]["code"] == "model_not_supported"
        refused = http.post(f"http://{address}/v1/chat/completions", json={**body, "tools": []})
        assert refused.status_code == 400 and "tools" in refused.json()["error"]["message"]


def test_verl_genrm_with_a_key_in_the_router_address(tenant_server):
    """A GenRM function sends no headers: the key goes in the address, ``host:port/k/<key>``."""
    key = tenant_server.keys["team-a"]
    address = f"{tenant_server.url.removeprefix('http://')}/k/{key}"
    body = {"messages": [{"role": "user", "content": GRM_PROMPT}], "temperature": 0.7, "top_p": 0.8}
    with httpx.Client(timeout=300) as http:
        out = http.post(
            f"http://{address}/v1/chat/completions", json={**body, "model": "tiny-vlm", "max_tokens": 4}
        )
        assert out.status_code == 200, out.text
        # without "model": the tenant server's default judge is a classifier, so /verl takes its
        # only generative judge
        out = http.post(f"http://{address}/verl/v1/chat/completions", json={**body, "max_tokens": 4})
        assert out.status_code == 200, out.text
        assert ChatCompletion(**out.json()).model == "tiny-vlm"
        no_key = http.post(f"{tenant_server.url}/verl/v1/chat/completions", json={**body, "max_tokens": 4})
        assert no_key.status_code == 401


# ---------------------------------------------------------------- request shapes: NeMo Gym


def test_nemo_gym_arena_judge_request_shape(server_url):
    """NeMo-RL has no HTTP judge client of its own (``nemo_rl/environments/reward_model_environment.py``
    runs the reward model in-process); its NeMo Gym environments do. Gym's pairwise arena judge
    (``resources_servers/arena_judge/app.py``, ``_judge_once``) sends its configured chat params
    (``configs/arena_judge.yaml``: ``max_tokens`` 4096 there, ``temperature`` 0.0) with a system and a
    user message through Gym's OpenAI model server (``responses_api_models/openai_model/app.py``,
    ``chat_completions``), which sets ``model`` and posts to ``{openai_base_url}/chat/completions``;
    it parses ``[[A>B]]``-style verdicts out of ``choices[0].message.content``."""
    body = {
        "messages": [
            {"role": "system", "content": "Compare the two answers. End with a verdict like [[A>B]]."},
            {"role": "user", "content": f"Question: {QUESTION}\n\nAnswer A: Paris.\n\nAnswer B: Lyon."},
        ],
        "max_tokens": 32,
        "temperature": 0.0,
        "model": "smollm2",
    }
    out = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=300)
    assert out.status_code == 200, out.text
    completion = ChatCompletion.model_validate(out.json())
    assert completion.choices[0].message.content and completion.choices[0].message.role == "assistant"
    again = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=300).json()
    assert again["choices"][0]["message"]["content"] == completion.choices[0].message.content  # greedy


# ---------------------------------------------------------------- request shapes: verifiers


def test_verifiers_request_shapes(server_url):
    """What verifiers sends, through the same client calls, whether or not verifiers is installed.
    0.4: ``Judge.complete`` (``verifiers/v1/judge.py``) on a client made by ``build_async_openai``
    (``verifiers/v1/clients/base.py``: no retries, its own httpx client), with the typed sampling
    fields as arguments and any other in ``extra_body``. 0.3: ``JudgeRubric.judge``
    (``verifiers/rubrics/judge_rubric.py``), ``max_tokens`` sent as ``max_completion_tokens``."""
    messages = [
        {"role": "user", "content": "Question: What is 2 + 2?\nResponse: 4\nCorrect? Answer yes or no."}
    ]

    async def calls():
        http = httpx.AsyncClient(timeout=httpx.Timeout(300))
        async with openai.AsyncOpenAI(
            base_url=f"{server_url}/v1", api_key="EMPTY", max_retries=0, http_client=http
        ) as client:
            v04 = await client.chat.completions.create(
                model="smollm2", messages=messages, temperature=0, max_tokens=8, extra_body={}
            )
            v03 = await client.chat.completions.create(
                model="smollm2", messages=messages, max_completion_tokens=8
            )
            refused = []
            for extra in ({"reasoning_effort": "low"}, {"extra_body": {"top_k": 20}}):
                with pytest.raises(openai.BadRequestError) as exc:
                    await client.chat.completions.create(model="smollm2", messages=messages, **extra)
                refused.append(exc.value.body["message"])
            return v04, v03, refused

    v04, v03, refused = asyncio.run(calls())
    for completion in (v04, v03):
        assert isinstance(completion.choices[0].message.content, str)
        assert completion.usage.prompt_tokens > 10 and 0 < completion.usage.completion_tokens <= 8
    assert "reasoning_effort" in refused[0] and "top_k" in refused[1]
