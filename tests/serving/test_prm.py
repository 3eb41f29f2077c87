"""Process reward models (kind: prm) served by vLLM's pooling runner: step scores equal a reference
computed with transformers on the same tokens, aggregates, comparisons, and the 422s of bad steps."""

from __future__ import annotations

import math

import pytest

from tests.model_factory import PRM_SEPARATOR, prm_reference

QUESTION = "What is 12 * 12?"
SOLUTION = "12 * 12 is 12 * 10 + 12 * 2.\n\n12 * 10 = 120 and 12 * 2 = 24.\n\n120 + 24 = 144."


def _post(client, route, body, status=200):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    return r.json()


def _reference_scores(model_dir, steps: list[str]) -> list[float]:
    """What the model gives each step, on the input the judge builds (the question as the user's
    turn, then each step as data followed by the separator token), computed with transformers."""
    from transformers import AutoTokenizer

    from reward_server.tokens import PromptTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = PromptTokenizer(tokenizer)
    ids = list(prompts.chat_ids([{"role": "user", "content": QUESTION}], generation_prompt=True))
    positions = []
    for step in steps:
        ids += prompts.data_ids(step)
        positions.append(len(ids))
        ids.append(tokenizer.convert_tokens_to_ids(PRM_SEPARATOR))
    probs = prm_reference(model_dir, ids)
    return [probs[p][1] for p in positions]


def test_step_scores_equal_the_reference_and_aggregate_as_asked(client, tiny_prm_dir):
    steps = SOLUTION.split("\n\n")
    want = _reference_scores(tiny_prm_dir, steps)
    items = [{"prompt": QUESTION, "response": SOLUTION}]
    r = _post(client, "/score", {"judge": "tiny-prm", "items": items})["results"][0]
    assert r["error"] is None, r
    assert r["step_scores"] == pytest.approx(want, abs=1e-3)
    assert r["score"] == pytest.approx(min(want), abs=1e-3)  # the judge's default aggregate
    assert [SOLUTION[a:b] for a, b in r["step_spans"]] == steps  # where each step's reward goes
    for how, value in (("last", want[-1]), ("mean", sum(want) / 3), ("product", math.prod(want))):
        got = _post(client, "/score", {"judge": "tiny-prm", "items": items, "aggregate": how})["results"][0]
        assert got["score"] == pytest.approx(value, abs=1e-3), how


def test_comparisons_and_win_rates_use_the_aggregates(client):
    short = "120 + 24 = 144."
    scores = [
        r["score"]
        for r in _post(
            client,
            "/score",
            {"judge": "tiny-prm", "items": [{"prompt": QUESTION, "response": x} for x in (SOLUTION, short)]},
        )["results"]
    ]
    pair = _post(
        client,
        "/pairwise",
        {"judge": "tiny-prm", "items": [{"prompt": QUESTION, "response_a": SOLUTION, "response_b": short}]},
    )["results"][0]
    assert pair["p_a"] == pytest.approx(1 / (1 + math.exp(-(scores[0] - scores[1]))), abs=1e-3)
    rates = _post(
        client, "/winrate", {"judge": "tiny-prm", "prompt": QUESTION, "responses": [SOLUTION, short]}
    )
    assert rates["win_rates"][0] == (1.0 if scores[0] > scores[1] else 0.0)


@pytest.mark.parametrize(
    ("response", "said"),
    [
        ("\n\n  \n\n", "no steps"),
        ("\n\n".join(["step"] * 200), "200 steps, over this judge's max_steps of 128"),
        (f"first{PRM_SEPARATOR}\n\nsecond", "step 0 contains the step separator"),
    ],
)
def test_bad_steps_are_a_422_naming_the_item(client, response, said):
    body = {
        "judge": "tiny-prm",
        "items": [{"prompt": QUESTION, "response": "ok"}, {"prompt": QUESTION, "response": response}],
    }
    r = client.post("/score", json=body)
    assert r.status_code == 422 and "items[1].response" in r.json()["message"] and said in r.json()["message"]


def test_aggregate_is_for_process_reward_models_only(client):
    body = {"judge": "tiny-rm", "items": [{"prompt": QUESTION, "response": "144"}], "aggregate": "min"}
    r = client.post("/score", json=body)
    assert r.status_code == 400 and "process reward models" in r.json()["message"]


def test_listed_steps_score_as_the_text_form_and_are_never_split_again(client, tiny_prm_dir):
    steps = SOLUTION.split("\n\n")
    merged = ["\n\n".join(steps[:2]), steps[2]]  # a step that holds the delimiter's text
    items = [
        {"prompt": QUESTION, "response": SOLUTION},
        {"prompt": QUESTION, "response": {"steps": steps}},
        {"prompt": QUESTION, "response": {"steps": merged}},
    ]
    text, listed, two = _post(client, "/score", {"judge": "tiny-prm", "items": items})["results"]
    assert listed["error"] is None and two["error"] is None, (listed, two)
    assert listed["step_scores"] == pytest.approx(text["step_scores"], abs=1e-6)
    assert listed["step_spans"] == text["step_spans"]
    assert two["step_scores"] == pytest.approx(_reference_scores(tiny_prm_dir, merged), abs=1e-3)
    assert two["step_spans"] == [[0, len(merged[0])], [len(merged[0]) + 2, len(SOLUTION)]]


def test_listed_steps_are_refused_by_other_kinds(client):
    body = {"judge": "tiny-rm", "items": [{"prompt": QUESTION, "response": {"steps": ["144"]}}]}
    r = client.post("/score", json=body)
    assert r.status_code == 422, r.text
    assert "items[0].response is given as a list of steps" in r.json()["message"]
    assert "'tiny-rm' is a classifier judge" in r.json()["message"]
