"""Drop-in shapes, driven the way the host frameworks drive them, against the real server."""

import json
import math
import os
import subprocess
import sys

import httpx
import pytest

from referee import AsyncReferee
from referee.auth import new_key
from referee.trl import preference_reward, score_reward, winrate_reward
from referee.verl import compute_score

QUESTION = "What is the capital of France?"
RESPONSES = ["The capital of France is Paris.", "I like turtles.", "Paris.", "Lyon."]


# ---------------------------------------------------------------- OpenRLHF


def _openrlhf_batch():
    # OpenRLHF posts chat-formatted prompts and the same text followed by each response.
    prompts = [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in (QUESTION, "Name a colour.")
    ]
    responses = [[RESPONSES[0], RESPONSES[1], RESPONSES[2]], ["Blue.", "Seven.", "Green, like grass."]]
    queries, prompt_list = [], []
    for p, rs in zip(prompts, responses, strict=True):
        for r in rs:
            queries.append(p + r + "<|im_end|>")
            prompt_list.append(p)
    return {"query": queries, "prompts": prompt_list, "labels": [""] * len(queries)}


def test_openrlhf_get_reward_with_a_classifier_scores_queries_as_sent(client):
    body = _openrlhf_batch()
    out = client.post("/get_reward?judge=tiny-rm", json=body)
    assert out.status_code == 200, out.text
    rewards = out.json()["rewards"]
    assert len(rewards) == len(body["query"]) and out.json()["scores"] == rewards
    raw = client.post(
        "/classify", json={"model": "tiny-rm", "input": body["query"], "use_activation": False}
    ).json()
    assert rewards == pytest.approx([d["probs"][0] for d in raw["data"]], abs=1e-5)


def test_openrlhf_get_reward_with_the_generative_judge_and_win_rates(client):
    body = _openrlhf_batch()
    scores = client.post("/get_reward", json=body).json()["rewards"]
    assert all(1.0 <= s <= 9.0 for s in scores)
    rates = client.post("/get_reward?reward=winrate&judge=tiny-rm", json=body).json()["rewards"]
    assert sum(rates[:3]) == pytest.approx(1.5) and sum(rates[3:]) == pytest.approx(1.5)


def test_openrlhf_errors_are_clear(client):
    body = _openrlhf_batch()
    no_prompts = client.post("/get_reward", json={"query": body["query"]})
    assert no_prompts.status_code == 422 and "prompts" in no_prompts.json()["message"]
    too_long = client.post("/get_reward?judge=tiny-rm", json={"query": ["word " * 3000]})
    assert too_long.status_code == 502 and "context length" in too_long.json()["message"]


def test_openrlhf_remote_rm_url_with_the_key_in_the_path(tenant_server):
    """OpenRLHF posts plain JSON to ``remote_rm_url`` and cannot add headers, so a server with
    tenants takes the key in the path: ``--remote_rm_url http://host:8000/k/<api_key>/get_reward``
    (any route under ``/k/<key>/`` is that route, authenticated with the key; the server logs the
    path without it). Sent here exactly as OpenRLHF sends it: a POST with a JSON body, no header."""
    body = _openrlhf_batch()
    key = tenant_server.keys["team-a"]
    url = f"{tenant_server.url}/k/{key}/get_reward?judge=tiny-rm"
    out = httpx.post(url, json=body, timeout=300)
    assert out.status_code == 200, out.text
    rewards = out.json()["rewards"]
    assert len(rewards) == len(body["query"]) and all(isinstance(r, float) for r in rewards)
    # The same answer as with the key in a header.
    with_header = httpx.post(
        f"{tenant_server.url}/get_reward?judge=tiny-rm",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )
    assert with_header.status_code == 200 and with_header.json()["rewards"] == pytest.approx(rewards)
    other = new_key("team-a")  # well formed, but not a key the server knows
    wrong = httpx.post(f"{tenant_server.url}/k/{other}/get_reward?judge=tiny-rm", json=body, timeout=300)
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert other not in wrong.text
    plain = httpx.post(f"{tenant_server.url}/get_reward?judge=tiny-rm", json=body, timeout=300)
    assert plain.status_code == 401 and plain.headers["WWW-Authenticate"].startswith("Bearer")
    assert key not in tenant_server.log.read_text()  # the path token is not logged


# ---------------------------------------------------------------- verl


def test_vllm_compatible_classify(client, tiny_classifier_dir):
    texts = ["Paris is the capital of France.", "I like turtles."]
    raw = client.post(
        "/classify", json={"model": str(tiny_classifier_dir), "input": texts, "use_activation": False}
    ).json()
    assert [d["index"] for d in raw["data"]] == [0, 1] and raw["data"][0]["num_classes"] == 1
    default = client.post("/classify", json={"model": "tiny-rm", "input": texts[0]}).json()
    logit = raw["data"][0]["probs"][0]
    assert default["data"][0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-5)
    assert client.post("/classify", json={"model": "smollm2", "input": "x"}).status_code == 400
    # The request shape other trainers send for raw reward-model logits.
    plain = client.post(
        "/classify",
        json={"model": "tiny-rm", "input": texts, "use_activation": False, "add_special_tokens": False},
    ).json()
    assert len(plain["data"]) == 2 and all(isinstance(d["probs"][0], float) for d in plain["data"])


def test_verl_batch_compute_score(server_url):
    infos = [{"question": QUESTION}] * 3 + [{"question": "Name a colour."}] * 2
    solutions = [*RESPONSES[:3], "Blue.", "Seven."]
    kw = dict(
        data_sources=["demo"] * 5,
        solution_strs=solutions,
        ground_truths=["Paris"] * 3 + ["Blue"] * 2,
        extra_infos=infos,
        url=server_url,
        judge="tiny-rm",
    )
    scores = compute_score(**kw, reward="score")
    assert len(scores) == 5 and all(isinstance(s, float) for s in scores)
    rates = compute_score(**kw, reward="winrate")
    assert sum(rates[:3]) == pytest.approx(1.5) and sum(rates[3:]) == pytest.approx(1.0)
    prefs = compute_score(**kw, reward="preference")
    assert all(0.0 <= p <= 1.0 for p in prefs)
    with pytest.raises(KeyError, match="question"):
        compute_score(**{**kw, "extra_infos": [{}] * 5})
    bad = {**kw, "solution_strs": [*solutions[:4], "word " * 3000]}
    with pytest.raises(RuntimeError, match="4 \\(demo\\)"):
        compute_score(**bad, reward="score")
    assert math.isnan(compute_score(**bad, reward="score", on_error="nan")[4])


# ---------------------------------------------------------------- TRL (called as GRPOTrainer calls them)


def _trl_batch():
    # Two prompts, their completions interleaved: grouping must follow the prompt, not the position.
    p1 = [{"role": "user", "content": QUESTION}]
    p2 = [{"role": "user", "content": "Name a colour."}]
    prompts = [p1, p2, p1, p2, p1, p2]
    texts = [RESPONSES[0], "Blue.", RESPONSES[1], "Seven.", RESPONSES[2], "Green."]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    return prompts, completions, texts


def test_trl_winrate_reward_groups_by_prompt(server_url, client):
    prompts, completions, texts = _trl_batch()
    logged = {}
    reward = winrate_reward(url=server_url, judge="tiny-rm", sync=True)
    values = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=None,
        trainer_state=None,
        log_metric=lambda k, v: logged.__setitem__(k, v),
    )
    direct = client.post(
        "/winrate", json={"judge": "tiny-rm", "prompt": QUESTION, "responses": [texts[0], texts[2], texts[4]]}
    ).json()["win_rates"]
    assert [values[0], values[2], values[4]] == pytest.approx(direct)
    assert sum(values[1::2]) == pytest.approx(1.5)
    assert reward.__name__ == "winrate"
    assert {"judge/latency_s", "judge/ties", "judge/invalid", "judge/winrate_spread"} <= logged.keys()


async def test_trl_async_rewards_and_failures_are_none(server_url):
    prompts, completions, _ = _trl_batch()
    scores = await score_reward(url=server_url, judge="tiny-rm")(prompts=prompts, completions=completions)
    assert all(isinstance(s, float) for s in scores)
    prefs = await preference_reward(url=server_url, judge="tiny-rm")(
        prompts=prompts, completions=completions, reference=["Paris.", "Red."] * 3
    )
    assert all(0.0 <= p <= 1.0 for p in prefs)
    failed = await winrate_reward(url=server_url, judge="no-such-judge")(
        prompts=prompts, completions=completions
    )
    assert failed == [None] * 6  # TRL's "could not score", not a tie


# ---------------------------------------------------------------- the SDK


def test_idempotency_key_answers_a_retry_without_judging_again(client):
    body = {"judge": "tiny-rm", "items": [{"prompt": QUESTION, "response": RESPONSES[0]}]}
    headers = {"Idempotency-Key": os.urandom(8).hex()}

    def engine_requests() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('referee_engine_requests_total{judge="tiny-rm"}'):
                return float(line.split()[-1])
        return 0.0

    first = client.post("/score", json=body, headers=headers).json()
    before = engine_requests()
    again = client.post("/score", json=body, headers=headers).json()
    assert again == first and engine_requests() == before
    reused = client.post("/score", json={**body, "items": body["items"] * 2}, headers=headers)
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"


async def test_async_client_keeps_many_requests_in_flight(server_url):
    import asyncio

    async with AsyncReferee(server_url) as ref:
        outs = await asyncio.gather(
            *[ref.score(judge="tiny-rm", items=[{"prompt": QUESTION, "response": r}]) for r in RESPONSES * 4]
        )
    assert len(outs) == 16 and all(o.results[0].score is not None for o in outs)


# ---------------------------------------------------------------- the command line


def _cli(*args, url):
    env = {**os.environ, "REFEREE_URL": url, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "referee.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_cli_one_off_questions(server_url, tmp_path):
    out = _cli(
        "score",
        "--judge",
        "tiny-rm",
        "--prompt",
        QUESTION,
        "--response",
        "Paris.",
        "--response",
        "Lyon.",
        url=server_url,
    )
    assert "POST /score (tiny-rm)" in out and "Lyon." in out
    out = _cli("pairwise", "--prompt", QUESTION, "--a", "Paris.", "--b", "Lyon.", url=server_url)
    assert "P(A better)" in out and "smollm2" in out
    group = tmp_path / "group.json"
    group.write_text(json.dumps({"prompt": QUESTION, "responses": RESPONSES}))
    out = _cli("winrate", "--file", str(group), "--judge", "tiny-rm", url=server_url)
    assert "6 comparisons" in out
