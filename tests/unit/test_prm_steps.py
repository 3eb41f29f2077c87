"""A response given as a list of steps (``{"steps": [...]}``): the protocol's shape, the process
reward model's checks (422s naming the step), spans, and the 422 of every other kind, through the
real service with a scripted engine that scores each step by its text."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from referee.protocol import (
    PairwiseItem,
    PairwiseRequest,
    ScoreItem,
    ScoreRequest,
    Steps,
    WinRateRequest,
    content_text,
    image_parts,
)
from reward_server.errors import ClientError
from reward_server.judges.prm import steps_of
from reward_server.service import JudgeService
from reward_server.settings import ServerSettings
from tests.support import ScriptedEngine

SEPARATOR = "<extra_0>"
# The scripted PRM's score of a step: looked up by its text, 0.5 for any other.
STEP_SCORES = {"a = 1": 0.9, "b = 2": 0.4, "so a + b = 3": 0.7, "x\n\ny": 0.2}


class ScriptedPRM(ScriptedEngine):
    """Step probabilities [1 - p, p] per separator, p from the step's text (``STEP_SCORES``)."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, "pooling")
        self.seen: list[list[str]] = []

    async def step_probs(self, token_ids, step_tag_id, *, priority=0, cache_salt=None):
        seps = [k for k, t in enumerate(token_ids) if t == step_tag_id]
        starts = [None, *seps[:-1]]
        steps = []
        for start, end in zip(starts, seps, strict=True):
            if start is None:  # the first step begins after the assistant turn's header
                text = self.tokenizer.decode(token_ids[:end])
                text = text.rsplit("assistant\n", 1)[-1]
            else:
                text = self.tokenizer.decode(token_ids[start + 1 : end])
            steps.append(text)
        self.seen.append(steps)
        return [[1 - STEP_SCORES.get(s, 0.5), STEP_SCORES.get(s, 0.5)] for s in steps]


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    return tok


@pytest.fixture()
def harness(tokenizer, embedded_dir):
    from reward_server.judges import ClassifierJudge, parse_judge_settings
    from reward_server.judges.prm import PRMJudge

    prm = parse_judge_settings({"name": "prm", "kind": "prm", "model": str(embedded_dir), "max_steps": 4})
    rm = parse_judge_settings({"name": "rm", "kind": "classifier", "model": str(embedded_dir)})
    service = JudgeService(ServerSettings(judges=[prm, rm], default_judge="prm", cache={"enabled": False}))
    engine = ScriptedPRM(tokenizer)
    classifier = ScriptedEngine(tokenizer, "pooling")
    classifier.logits.update({"alpha": 1.0})
    service.judges = {"prm": PRMJudge(prm, engine), "rm": ClassifierJudge(rm, classifier)}
    return service, engine


# ---------------------------------------------------------------- the shape


def test_steps_are_an_object_wherever_a_response_goes():
    item = ScoreItem.model_validate({"prompt": "Q", "response": {"steps": ["a", "b"]}})
    assert item.response == Steps(steps=["a", "b"])
    pair = PairwiseItem.model_validate({"prompt": "Q", "response_a": {"steps": ["a"]}, "response_b": "b"})
    assert isinstance(pair.response_a, Steps) and pair.response_b == "b"
    group = WinRateRequest.model_validate({"prompt": "Q", "responses": [{"steps": ["a"]}, "b"]})
    assert isinstance(group.responses[0], Steps)
    with pytest.raises(ValidationError):  # a typo is an error, never silently text
        ScoreItem.model_validate({"prompt": "Q", "response": {"step": ["a"]}})
    with pytest.raises(ValidationError):
        ScoreItem.model_validate({"prompt": "Q", "response": {"steps": "a"}})


def test_steps_text_view_holds_no_images():
    steps = Steps(steps=["a", "b"])
    assert content_text(steps) == "a\n\nb" and steps.text("\n") == "a\nb"
    assert image_parts(steps) == []


def test_spans_of_listed_steps_index_them_joined_with_the_delimiter():
    steps, spans = steps_of(Steps(steps=["ab", "c\n\nd"]), "\n\n")
    assert steps == ["ab", "c\n\nd"]  # never split again
    joined = "\n\n".join(steps)
    assert [joined[a:b] for a, b in spans] == steps
    assert steps_of("ab\n\n\n\nc", "\n\n") == (["ab", "c"], [(0, 2), (6, 7)])


# ---------------------------------------------------------------- served by the pipeline


async def test_listed_steps_are_scored_as_given(harness):
    service, _ = harness
    listed = Steps(steps=["a = 1", "b = 2", "so a + b = 3"])
    out = await service.score(
        ScoreRequest(
            items=[
                ScoreItem(prompt="Q?", response=listed),
                ScoreItem(prompt="Q?", response="a = 1\n\nb = 2\n\nso a + b = 3"),
            ]
        )
    )
    first, second = out.results
    assert first.error is None, first.error
    assert first.step_scores == pytest.approx([0.9, 0.4, 0.7])
    assert first.score == pytest.approx(0.4)  # min
    assert first.step_spans == second.step_spans  # where the text form puts them
    assert second.step_scores == pytest.approx(first.step_scores)


async def test_a_listed_step_may_hold_the_delimiter_text(harness):
    service, engine = harness
    out = await service.score(
        ScoreRequest(items=[ScoreItem(prompt="Q?", response=Steps(steps=["x\n\ny", "b = 2"]))])
    )
    r = out.results[0]
    assert r.error is None, r.error
    assert engine.seen[-1][0].endswith("x\n\ny")  # one step, not two
    assert r.step_scores == pytest.approx([0.2, 0.4]) and r.step_spans == [[0, 4], [6, 11]]


async def test_pairwise_and_winrate_take_listed_steps(harness):
    service, _ = harness
    good, bad = Steps(steps=["a = 1", "so a + b = 3"]), Steps(steps=["b = 2"])
    pair = await service.pairwise(
        PairwiseRequest(items=[PairwiseItem(prompt="Q?", response_a=good, response_b=bad)])
    )
    assert pair.results[0].verdict == "A"
    group = await service.winrate(WinRateRequest(prompt="Q?", responses=[bad, good, "a = 1"]))
    assert group.scores == pytest.approx([0.4, 0.7, 0.9])
    assert group.win_rates == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("steps", "said"),
    [
        ([], "items[0].response: no steps"),
        (["a"] * 5, "5 steps, over this judge's max_steps of 4"),
        (["a", "  "], "items[0].response.steps[1] is empty"),
        (["a", f"b{SEPARATOR}"], "items[0].response.steps[1] contains the step separator"),
    ],
)
async def test_bad_listed_steps_are_a_422_naming_the_step(harness, steps, said):
    service, _ = harness
    with pytest.raises(ClientError) as err:
        await service.score(ScoreRequest(items=[ScoreItem(prompt="Q?", response=Steps(steps=steps))]))
    assert err.value.status == 422 and said in err.value.message


async def test_a_reference_may_be_listed_steps_too(harness):
    service, _ = harness
    with pytest.raises(ClientError) as err:
        await service.score(
            ScoreRequest(
                transform="par",
                items=[ScoreItem(prompt="Q?", response="a = 1", reference=Steps(steps=[]))],
            )
        )
    assert err.value.status == 422 and "items[0].reference: no steps" in err.value.message


@pytest.mark.parametrize(
    "request_",
    [
        ScoreRequest(judge="rm", items=[ScoreItem(prompt="Q?", response=Steps(steps=["Paris alpha."]))]),
        PairwiseRequest(
            judge="rm", items=[PairwiseItem(prompt="Q?", response_a="x", response_b=Steps(steps=["y"]))]
        ),
        WinRateRequest(judge="rm", prompt="Q?", responses=["x", Steps(steps=["y"])]),
    ],
    ids=["score", "pairwise", "winrate"],
)
async def test_other_kinds_refuse_listed_steps_naming_the_kind(harness, request_):
    service, _ = harness
    ask = {ScoreRequest: service.score, PairwiseRequest: service.pairwise, WinRateRequest: service.winrate}
    with pytest.raises(ClientError) as err:
        await ask[type(request_)](request_)
    message = err.value.message
    assert err.value.status == 422
    assert "given as a list of steps" in message and "'rm' is a classifier judge" in message
    assert "kind prm" in message
