"""Step rewards in the SDK, without a server: ``step_rewards`` and ``token_rewards`` on the HTTP
clients (a mock transport), ``QueueReferee.step_rewards`` on its send path, the dense-reward
placement, and the verl and TRL adapters' use of a process reward model's answer."""

from __future__ import annotations

import json
import math

import httpx
import pytest

import referee
from referee import AsyncReferee, QueueReferee, Referee, StepReward, StepRewardError, Steps
from referee.protocol import ScoreRequest, ScoreResponse
from referee.steps import place_on_tokens

TEXT = "a = 1\n\nb = 2\n\nso 3"
PRM_RESULT = {
    "index": 0,
    "score": 0.25,
    "step_scores": [0.5, 0.25, 0.75],
    "step_spans": [[0, 5], [7, 12], [14, 18]],
}


def _answer(*results: dict) -> dict:
    return {"judge": "prm", "results": list(results), "usage": {}}


def _recording(answer: dict):
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append({"path": request.url.path, **json.loads(request.content)})
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handler), seen


def test_step_rewards_sends_text_or_listed_steps_and_returns_the_typed_answer():
    transport, seen = _recording(_answer(PRM_RESULT))
    with Referee("http://referee", transport=transport) as ref:
        got = ref.step_rewards("Q?", TEXT, judge="prm")
        listed = ref.step_rewards("Q?", ["a = 1", "b = 2", "so 3"], judge="prm", aggregate="last")
    assert got == StepReward(
        step_scores=[0.5, 0.25, 0.75], step_spans=[(0, 5), (7, 12), (14, 18)], aggregate=0.25
    )
    assert seen[0] == {"path": "/score", "judge": "prm", "items": [{"prompt": "Q?", "response": TEXT}]}
    assert seen[1]["items"][0]["response"] == {"steps": ["a = 1", "b = 2", "so 3"]}
    assert seen[1]["aggregate"] == "last"
    assert isinstance(listed, StepReward) and referee.StepReward is StepReward


async def test_async_step_and_token_rewards():
    transport, seen = _recording(_answer(PRM_RESULT))
    # "a = 1" "\n\n" "b = 2" "\n\n" "so 3", cut into tokens by their characters
    offsets = [(0, 1), (1, 5), (5, 7), (7, 9), (9, 12), (12, 14), (14, 16), (16, 18)]
    async with AsyncReferee("http://referee", transport=transport) as ref:
        step = await ref.step_rewards("Q?", Steps(steps=["a = 1", "b = 2", "so 3"]))
        dense = await ref.token_rewards("Q?", TEXT, offsets=offsets, judge="prm")
    assert step.aggregate == 0.25 and "judge" not in seen[0]
    assert dense == [0.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.0, 0.75]


def test_token_rewards_with_a_tokenizer_on_listed_steps_joined_as_the_caller_says(embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    result = {**PRM_RESULT, "step_scores": [0.5, 0.25], "step_spans": [[0, 5], [7, 12]]}
    transport, _ = _recording(_answer(result))
    steps = ["a = 1", "b = 2"]
    with Referee("http://referee", transport=transport) as ref:
        dense = ref.token_rewards("Q?", steps, tokenizer=tokenizer, delimiter="\n")
    text = "a = 1\nb = 2"
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(dense) == len(encoded["input_ids"])
    nonzero = [(encoded["offset_mapping"][t], r) for t, r in enumerate(dense) if r]
    # each score on the token holding its step's last character
    assert [r for _, r in nonzero] == [0.5, 0.25]
    assert [text[a:b] for (a, b), _ in nonzero][-1].endswith("2") and nonzero[0][0][1] >= 5 > nonzero[0][0][0]


def test_token_rewards_needs_offsets_or_a_tokenizer_before_asking():
    transport, seen = _recording(_answer(PRM_RESULT))
    with Referee("http://referee", transport=transport) as ref, pytest.raises(ValueError, match="offsets"):
        ref.token_rewards("Q?", TEXT)
    assert seen == []


@pytest.mark.parametrize(
    ("result", "said"),
    [
        ({"index": 0, "score": 1.5}, "gave no step scores: step rewards need a process reward model"),
        ({"index": 0, "error": "the judge's input is too long"}, "could not score the steps: the judge's"),
    ],
)
def test_an_answer_without_step_scores_is_a_step_reward_error(result, said):
    transport, _ = _recording(_answer(result))
    with Referee("http://referee", transport=transport) as ref, pytest.raises(StepRewardError, match=said):
        ref.step_rewards("Q?", TEXT)


def test_a_response_that_is_neither_text_nor_steps_is_refused():
    transport, _ = _recording(_answer(PRM_RESULT))
    with (
        Referee("http://referee", transport=transport) as ref,
        pytest.raises(TypeError, match="list of steps"),
    ):
        ref.step_rewards("Q?", [1, 2])


async def test_queue_step_rewards_uses_the_score_message():
    client = QueueReferee("redis://127.0.0.1:6379/0", job_id="steps-unit")
    sent = []

    async def _call(type_, request, out):
        sent.append((type_, request))
        return ScoreResponse.model_validate(_answer(PRM_RESULT))

    client._call = _call
    try:
        got = await client.step_rewards("Q?", ["a = 1", "b = 2", "so 3"], judge="prm", aggregate="mean")
    finally:
        await client.aclose()
    ((type_, request),) = sent
    assert type_ == "score" and isinstance(request, ScoreRequest)
    assert (
        request.items[0].response == Steps(steps=["a = 1", "b = 2", "so 3"]) and request.aggregate == "mean"
    )
    assert got.step_scores == [0.5, 0.25, 0.75] and got.aggregate == 0.25


# ---------------------------------------------------------------- the dense-reward convention


def test_each_step_score_goes_on_the_last_token_overlapping_the_step():
    # tokens: "ab" "c\n" "\nd" "e" -- the second token holds the end of step 0 and the delimiter
    offsets = [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert place_on_tokens([0.3, 0.6], [(0, 3), (5, 7)], offsets) == [0.0, 0.3, 0.0, 0.6]
    # special tokens (no characters) never hold a reward
    assert place_on_tokens([1.0], [(0, 2)], [(0, 2), (0, 0)]) == [1.0, 0.0]
    # two steps ending in one token: their sum, so the rewards' total is the steps'
    assert place_on_tokens([0.25, 0.5], [(0, 2), (2, 3)], [(0, 3)]) == [0.75]


def test_a_step_no_token_covers_is_an_error_not_a_lost_reward():
    with pytest.raises(ValueError, match=r"step 1 .* overlaps no token"):
        place_on_tokens([0.5, 0.5], [(0, 2), (4, 6)], [(0, 2), (2, 3)])


# ---------------------------------------------------------------- adapters


def _patched(monkeypatch, module, answer):
    transport, seen = _recording(answer)

    class Recording(AsyncReferee):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, transport=transport, **kwargs)

    monkeypatch.setattr(module, "AsyncReferee", Recording)
    return seen


def test_verl_gives_the_aggregate_as_score_and_the_steps_as_extras(monkeypatch):
    import referee.verl
    from referee.verl import compute_score

    failed = {"index": 1, "error": "the judge's input is too long"}
    seen = _patched(monkeypatch, referee.verl, _answer(PRM_RESULT, failed))
    infos = [{"question": "Q?"}, {"question": "Q?"}]
    out = compute_score(
        ["math", "math"], [TEXT, "x"], [None, None], infos, judge="prm", aggregate="min", on_error="nan"
    )
    assert seen[0]["aggregate"] == "min"
    assert out[0] == {
        "score": 0.25,
        "steps": 3,
        "step_scores": "[0.5, 0.25, 0.75]",
        "step_spans": "[[0, 5], [7, 12], [14, 18]]",
    }
    assert set(out[1]) == set(out[0]) and math.isnan(out[1]["score"]) and out[1]["steps"] == 0
    # the shape verl's batch reward manager makes of them: one array per key over the batch
    import numpy as np

    extras = {k: np.array([o[k] for o in out]) for k in out[0]}
    assert extras["step_scores"].shape == (2,) and json.loads(extras["step_scores"][0]) == [0.5, 0.25, 0.75]


def test_verl_with_a_judge_without_steps_still_gives_floats(monkeypatch):
    import referee.verl
    from referee.verl import compute_score

    _patched(monkeypatch, referee.verl, _answer({"index": 0, "score": 1.5}))
    assert compute_score(["d"], ["r"], [None], [{"question": "Q?"}]) == [1.5]


def test_trl_score_reward_takes_the_aggregate(monkeypatch):
    import referee.trl
    from referee.trl import score_reward

    seen = _patched(monkeypatch, referee.trl, _answer(PRM_RESULT))
    with score_reward(url="http://referee", judge="prm", aggregate="last", sync=True) as reward:
        assert reward(prompts=["Q?"], completions=[TEXT]) == [0.25]
    assert seen[0]["aggregate"] == "last" and seen[0]["items"][0]["response"] == TEXT
