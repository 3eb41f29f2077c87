"""One sample per call, win rates per group: OpenRLHF's own reward client (its package, unmodified)
and slime's remote reward request against the real server, which gathers each prompt's group."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

PROMPT = "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n"
RESPONSES = ["Red.", "Blue is one.", "Green, in light.", "I like turtles."]


def direct_win_rates(client, judge: str, prompt: str, responses: list[str]) -> dict[str, float]:
    r = client.post("/winrate", json={"judge": judge, "prompt": prompt, "responses": responses})
    assert r.status_code == 200, r.text
    return dict(zip(responses, r.json()["win_rates"], strict=True))


def test_openrlhf_agent_executor_gets_win_rates_one_sample_per_call(server_url, client):
    """OpenRLHF's SingleTurnAgentExecutor posts each finished sample alone to remote_rm_url
    (openrlhf/utils/agent.py, ``_fetch_rewards_via_http``); with group_size the server gathers the
    prompt's samples across those calls and answers each with its own win rate."""
    agent = pytest.importorskip("openrlhf.utils.agent")
    url = f"{server_url}/get_reward?reward=winrate&group_size=4&judge=tiny-rm"
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=url)

    async def one(response: str):
        return await executor._fetch_rewards_via_http([PROMPT + response], [PROMPT], [None])

    async def run():
        return await asyncio.gather(*[one(r) for r in RESPONSES])

    answers = asyncio.run(run())
    got = {r: a[0]["rewards"][0] for r, a in zip(RESPONSES, answers, strict=True)}
    # the same numbers as one /winrate call with the whole group (prompt text as OpenRLHF split it)
    assert got == pytest.approx(direct_win_rates(client, "tiny-rm", PROMPT, RESPONSES), abs=1e-9)
    assert sum(got.values()) == pytest.approx(len(RESPONSES) / 2)


def test_without_group_size_a_lone_sample_gets_a_4xx_naming_group_size(client):
    r = client.post(
        "/get_reward?reward=winrate&judge=tiny-rm", json={"query": [PROMPT + "Red."], "prompts": [PROMPT]}
    )
    assert r.status_code == 422 and "group_size" in r.json()["message"]


# slime posts exactly this body (slime/rollout/rm_hub/__init__.py, remote_rm) and uses the JSON
# answer itself as the reward.
def slime_body(response: str, prompt=PROMPT) -> dict:
    return {"prompt": prompt, "response": response, "label": "red"}


def test_slime_remote_rm_scores_a_sample_as_a_bare_number(client):
    r = client.post("/slime/reward?judge=tiny-rm", json=slime_body("Red."))
    assert r.status_code == 200, r.text
    value = r.json()
    assert isinstance(value, float)
    scored = client.post(
        "/score", json={"judge": "tiny-rm", "items": [{"prompt": PROMPT, "response": "Red."}]}
    )
    assert value == pytest.approx(scored.json()["results"][0]["score"], abs=1e-6)
    chat = [{"role": "user", "content": "Name a primary colour."}]
    assert isinstance(client.post("/slime/reward?judge=tiny-rm", json=slime_body("Red.", chat)).json(), float)


def test_slime_win_rates_gathered_with_the_generative_judge(server_url, client):
    responses = RESPONSES[:3]

    async def run():
        async with httpx.AsyncClient(base_url=server_url, timeout=300) as http:
            calls = [
                http.post("/slime/reward?reward=winrate&group_size=3&judge=smollm2", json=slime_body(r))
                for r in responses
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(run())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    got = {r: a.json() for r, a in zip(responses, answers, strict=True)}
    # order=both judges each pair in both orders: the arrival order of the samples does not matter
    assert got == pytest.approx(direct_win_rates(client, "smollm2", PROMPT, responses), abs=1e-6)


def test_an_incomplete_group_is_answered_at_its_deadline(server_url):
    group_timeout_s = 1.5

    async def run(policy: str):
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
            url = f"/slime/reward?reward=winrate&group_size=3&judge=tiny-rm&group_timeout_s={group_timeout_s}"
            url += f"&incomplete={policy}"
            prompt = f"{PROMPT} ({policy})"  # a group of its own
            start = time.monotonic()
            answers = await asyncio.gather(
                *[http.post(url, json=slime_body(r, prompt)) for r in RESPONSES[:2]]
            )
            return answers, time.monotonic() - start

    judged, waited = asyncio.run(run("judge"))
    assert [a.status_code for a in judged] == [200, 200]
    # at its deadline, not before: the group waited for its third sample (the server's own timer,
    # so a slower machine only waits longer; the client's timeout guards against waiting forever)
    assert waited >= group_timeout_s
    assert sorted(a.json() for a in judged) in ([0.0, 1.0], [0.5, 0.5])  # two responses: one comparison
    refused, _ = asyncio.run(run("error"))
    assert [a.status_code for a in refused] == [504, 504]
    assert "2 of its 3" in refused[0].json()["message"]


def test_groups_are_kept_apart_by_tenant(tenant_server):
    """team-a's and team-b's samples of the same prompt never complete each other's group."""

    async def run():
        async with httpx.AsyncClient(base_url=tenant_server.url, timeout=60) as http:
            url = "/slime/reward?reward=winrate&group_size=2&group_timeout_s=2&incomplete=error"
            a = http.post(url, json=slime_body("Red."), headers=tenant_server.headers("team-a"))
            b = http.post(url, json=slime_body("Blue."), headers=tenant_server.headers("team-b"))
            return await asyncio.gather(a, b)

    a, b = asyncio.run(run())
    assert (a.status_code, b.status_code) == (504, 504), (a.text, b.text)
