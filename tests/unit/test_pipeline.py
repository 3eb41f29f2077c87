"""The one pipeline's pure parts: content normalisation, the runner's limits for every question type,
win-rate tallies, and a kind fed content parts through the real service with a scripted engine."""

from __future__ import annotations

import pytest

from referee.protocol import (
    ImagePart,
    JudgeItem,
    JudgeRequest,
    Message,
    PairwiseItem,
    PairwiseRequest,
    ScoreItem,
    ScoreRequest,
    TextPart,
    WinRateRequest,
)
from referee.rewards import tally_group
from reward_server.errors import ClientError
from reward_server.questions import (
    ClassifyQuestion,
    CotJudgeQuestion,
    GenerateQuestion,
    PairwiseQuestion,
    ScoreQuestion,
    WinRateQuestion,
    normalise,
)
from reward_server.service import JudgeService
from reward_server.settings import ServerSettings
from tests.support import ScriptedEngine

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


# ---------------------------------------------------------------- content, normalised once


def test_text_parts_become_their_text_everywhere_in_a_request():
    req = ScoreRequest(
        items=[
            ScoreItem(
                prompt=[
                    Message(role="user", content=[TextPart(text="Capital "), TextPart(text="of France?")])
                ],
                response=[TextPart(text="Paris.")],
            ),
            ScoreItem(prompt="Plain?", response="Plain."),
        ]
    )
    out = normalise(req)
    assert out.items[0].prompt[0].content == "Capital of France?"
    assert out.items[0].response == "Paris."
    assert out.items[1] is req.items[1]  # nothing to change: the same object
    # the caller's request is left as it was
    assert isinstance(req.items[0].response, list) and isinstance(req.items[0].prompt[0].content, list)


def test_content_with_an_image_stays_parts():
    content = [TextPart(text="Which is better?"), ImagePart(data=PNG)]
    req = WinRateRequest(
        prompt=[Message(role="user", content=content)], responses=["a", [TextPart(text="b")]]
    )
    out = normalise(req)
    assert out.prompt[0].content is req.prompt[0].content
    assert out.responses == ["a", "b"]


def test_an_empty_parts_list_is_left_alone():
    assert normalise([]) == []


# ---------------------------------------------------------------- every limit, in one place


@pytest.fixture()
def service() -> JudgeService:
    limits = {"max_text_chars": 100, "max_request_chars": 250, "max_items": 8, "max_messages": 4}
    return JudgeService(ServerSettings(limits=limits, cache={"enabled": False}))


def _questions(text: str, n: int):
    """One question of every type, each with n texts of ``text``."""
    return {
        "score": ScoreQuestion(ScoreRequest(items=[ScoreItem(prompt="q", response=text)] * n)),
        "pairwise": PairwiseQuestion(
            PairwiseRequest(items=[PairwiseItem(prompt="q", response_a=text, response_b="b")] * n)
        ),
        "judge": CotJudgeQuestion(JudgeRequest(items=[JudgeItem(prompt="q", response=text)] * n)),
        "winrate": WinRateQuestion(WinRateRequest(prompt="q", responses=[text] * n)),
        "classify": ClassifyQuestion(judge=None, texts=[text] * n),
        "classify-chat": ClassifyQuestion(
            judge=None, messages=[Message(role="user", content=[TextPart(text=text)])] * min(n, 4)
        ),
        "generate": GenerateQuestion(
            model="m",
            params={"n": 1, "max_tokens": 8},
            messages=[Message(role="user", content=text)] * min(n, 4),
        ),
    }


@pytest.mark.parametrize("kind", list(_questions("x", 2)))
def test_the_request_character_budget_applies_to_every_question_type(service, kind):
    service.check_limits(_questions("x" * 90, 2)[kind])  # 180 characters: within the budget
    q = _questions("x" * 90, 4)[kind]
    q.normalise()
    with pytest.raises(ClientError) as refused:
        service.check_limits(q)
    assert refused.value.status == 413
    assert "limits.max_request_chars" in refused.value.message


@pytest.mark.parametrize("kind", list(_questions("x", 2)))
def test_a_text_over_the_limit_is_named_for_every_question_type(service, kind):
    q = _questions("x" * 101, 2)[kind]
    q.normalise()
    with pytest.raises(ClientError) as refused:
        service.check_limits(q)
    assert refused.value.status == 413 and "limits.max_text_chars" in refused.value.message


def test_too_many_chat_messages_are_refused_in_any_prompt(service):
    many = [Message(role="user", content="hi")] * 5
    for q in (
        ScoreQuestion(ScoreRequest(items=[ScoreItem(prompt=many, response="r")])),
        WinRateQuestion(WinRateRequest(prompt=many, responses=["a", "b"])),
        ClassifyQuestion(judge=None, messages=many),
        GenerateQuestion(model="m", params={"n": 1, "max_tokens": 8}, messages=many),
    ):
        with pytest.raises(ClientError) as refused:
            service.check_limits(q)
        assert "limits.max_messages" in refused.value.message


# ---------------------------------------------------------------- win-rate tallies


def test_a_tally_counts_ties_and_leaves_invalid_pairs_out():
    pairs = [(0, 1), (0, 2), (1, 2)]
    outcomes = [(0.9, "A", None), (0.5, "tie", None), (None, "invalid", "no verdict")]
    tally = tally_group(3, pairs, outcomes)
    assert tally.win_matrix[0][1] == 1.0 and tally.win_matrix[1][0] == 0.0
    assert tally.win_matrix[1][2] is None and tally.win_matrix[2][1] is None
    assert tally.win_rates == [0.75, 0.0, 0.5]
    assert (tally.ties, tally.invalid) == (1, 1)
    assert tally.errors == ["responses 1 vs 2: no verdict"]
    assert tally.strengths is None


def test_a_soft_tally_credits_probabilities_and_bradley_terry_fits_strengths():
    pairs = [(0, 1), (1, 2)]
    soft = tally_group(3, pairs, [(0.8, "A", None), (0.6, "A", None)], soft=True)
    assert soft.win_matrix[0][1] == pytest.approx(0.8) and soft.win_matrix[2][1] == pytest.approx(0.4)
    bt = tally_group(3, pairs, [(1.0, "A", None), (1.0, "A", None)], estimate="bradley_terry")
    assert bt.strengths is not None and bt.strengths[0] > bt.strengths[1] > bt.strengths[2]
    assert bt.win_rates[0] > bt.win_rates[1] > bt.win_rates[2]
    with pytest.raises(ValueError):
        tally_group(3, pairs, [(1.0, "A", None)])


# ---------------------------------------------------------------- a kind fed content parts


@pytest.fixture()
def harness(tiny_classifier_dir):
    from transformers import AutoTokenizer

    from reward_server.judges import ClassifierJudge, parse_judge_settings

    settings = parse_judge_settings(
        {"name": "rm-sigmoid", "kind": "classifier", "model": str(tiny_classifier_dir)}
    )
    service = JudgeService(
        ServerSettings(judges=[settings], default_judge="rm-sigmoid", cache={"enabled": False})
    )
    rm = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_classifier_dir), "pooling")
    service.judges = {"rm-sigmoid": ClassifierJudge(settings, rm)}
    return service, rm


async def test_a_classifier_scores_text_parts_as_their_text(harness):
    service, rm = harness
    rm.logits.update({"alpha": 1.25})
    plain = await service.score(
        ScoreRequest(judge="rm-sigmoid", items=[ScoreItem(prompt="Q?", response="Paris alpha.")])
    )
    parts = await service.score(
        ScoreRequest(
            judge="rm-sigmoid",
            items=[
                ScoreItem(
                    prompt=[Message(role="user", content=[TextPart(text="Q?")])],
                    response=[TextPart(text="Paris "), TextPart(text="alpha.")],
                )
            ],
        )
    )
    assert plain.results[0].error is None and parts.results[0].error is None, parts.results[0].error
    assert parts.results[0].score == plain.results[0].score


# ---------------------------------------------------------------- the OpenAI face's bounds


def _generate(**params) -> GenerateQuestion:
    return GenerateQuestion(model="m", params={"n": 1, "max_tokens": 16, **params}, prompt="Say hi.")


@pytest.mark.parametrize(
    ("params", "limit"),
    [
        ({"stop": ["x"] * 17}, "limits.max_stop_strings"),
        ({"stop": "y" * 257}, "limits.max_stop_chars"),
        ({"n": 8, "max_tokens": 2048, "logprobs": 20}, "limits.max_logprob_entries"),
        ({"max_tokens": 4096}, "limits.max_new_tokens"),
    ],
)
def test_openai_style_requests_are_bounded(service, params, limit):
    service.check_limits(_generate(stop=["a", "b"], logprobs=5))  # within every bound
    with pytest.raises(ClientError) as refused:
        service.check_limits(_generate(**params))
    assert refused.value.status == 400 and limit in refused.value.message


# ---------------------------------------------- images: checked before admission, decoded after


def _png(size, color) -> str:
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


async def test_a_request_over_the_pixel_budget_is_refused_before_any_image_is_decoded(monkeypatch):
    from reward_server import media
    from reward_server.settings import MediaSettings

    settings = MediaSettings(max_image_pixels=1_000_000, max_request_pixels=2_500_000, max_images=8)
    loaded = []
    real_load = media.load_image
    monkeypatch.setattr(media, "load_image", lambda p: loaded.append(p.where) or real_load(p))
    store = media.MemoryBlobStore(settings)
    # solid colours: a few hundred bytes each, a million pixels each once decoded
    images = [ImagePart(data=_png((1000, 1000), (k, 0, 0))) for k in range(3)]
    parts = [(f"responses[{k}]", p) for k, p in enumerate(images)]
    with pytest.raises(media.MediaError) as refused:
        await media.probe(parts, store, "t", settings)
    assert refused.value.status == 413 and "media.max_request_pixels" in refused.value.message
    assert "responses[2]" in refused.value.message
    assert loaded == []  # nothing decoded

    plan = await media.probe(parts[:2], store, "t", settings)  # within the budget: checked, not decoded
    assert (plan.images, plan.pixels, loaded) == (2, 2_000_000, [])
    assert await media.decode(plan) == 2
    assert loaded == ["responses[0]", "responses[1]"] and images[0]._image.size == (1000, 1000)


def test_a_listwise_group_with_more_images_than_the_judge_takes_per_prompt_is_refused():
    from types import SimpleNamespace

    engine = SimpleNamespace(extra={"limit_mm_per_prompt": {"image": 4}})
    judge = SimpleNamespace(
        name="vlm",
        kind="generative",
        settings=SimpleNamespace(engine=engine),
        pairwise_modes=("logprob", "cot"),
        schedules=("pairs", "listwise"),
        pointwise=False,
        inconsistent_rule=lambda req: "tie",
        pair_options=lambda req: {},
        schedule=lambda n, k: [(0, 1)],
    )
    group = [[ImagePart(data=_png((8, 8), (k, 0, 0)))] for k in range(5)]
    q = WinRateQuestion(
        WinRateRequest(prompt="Which is a fox?", responses=group, schedule="listwise", mode="cot")
    )
    with pytest.raises(ClientError) as refused:
        q.prepare(judge)
    assert refused.value.status == 422 and "limit_mm_per_prompt" in refused.value.message
    assert "5 images" in refused.value.message
    WinRateQuestion(WinRateRequest(prompt="q", responses=group[:4], schedule="listwise", mode="cot")).prepare(
        judge
    )
    WinRateQuestion(WinRateRequest(prompt="q", responses=group)).prepare(judge)  # pairs: two at a time
