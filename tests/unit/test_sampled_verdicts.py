"""Verdicts by majority of sampled judgments (samples > 1): the vote, the mean rating, what a request
may ask and what it costs. Served with the embedded judge in tests/serving/test_server_routes.py."""

from __future__ import annotations

import pytest

from referee.protocol import JudgeItem, JudgeRequest, PairwiseItem, PairwiseRequest, WinRateRequest
from reward_server.errors import ClientError
from reward_server.judges.base import add_votes, flip_votes
from reward_server.judges.generative import GenerativeSettings, mean_rating, vote
from reward_server.questions import CotJudgeQuestion, PairwiseQuestion, WinRateQuestion
from reward_server.service import JudgeService
from reward_server.settings import ServerSettings


def _out(verdict):
    return (
        verdict,
        f"... [[{verdict}]]" if verdict else "no verdict",
        1,
        None if verdict else "no [[A]]/[[B]]",
    )


def test_the_majority_of_valid_samples_is_the_verdict_and_invalid_ones_do_not_vote():
    c = vote([_out("A"), _out("A"), _out("B"), _out(None), _out(None)])
    assert (c.verdict, c.votes) == ("A", {"A": 2, "B": 1, "tie": 0, "invalid": 2})
    assert c.p_first == pytest.approx(2 / 3) and c.uncertainty == pytest.approx(0.4714, abs=1e-4)
    assert c.rationale == "... [[A]]" and c.attempts == 5


def test_an_even_split_between_a_and_b_is_a_tie_and_no_valid_sample_is_invalid():
    split = vote([_out("A"), _out("B")])
    assert split.verdict == "tie" and split.p_first == 0.5 and split.uncertainty == 0.5
    none = vote([_out(None), _out(None), _out(None)])
    assert none.verdict == "invalid" and none.p_first is None
    assert none.error.startswith("none of 3 sampled judgments gave a verdict")
    assert none.votes == {"A": 0, "B": 0, "tie": 0, "invalid": 3}


def test_sampled_ratings_average_the_valid_ones():
    r = mean_rating([(7.0, "7", 1, None), (9.0, "9", 2, None), (None, "?", 1, "no rating")])
    assert r.score == 8.0 and r.uncertainty == 1.0 and r.votes == {"7": 1, "9": 1, "invalid": 1}
    assert r.attempts == 4
    assert mean_rating([(None, "?", 1, "no rating")]).error.startswith("none of 1 sampled judgments")


def test_votes_are_turned_to_a_side_and_added_across_orders():
    ab = {"A": 2, "B": 1, "tie": 0, "invalid": 0}
    ba = {"A": 0, "B": 3, "tie": 0, "invalid": 0}  # B first: its "B" is A's win
    assert add_votes(ab, flip_votes(ba)) == {"A": 5, "B": 1, "tie": 0, "invalid": 0}
    assert add_votes(None, None) is None


@pytest.fixture()
def service(embedded_dir) -> JudgeService:
    settings = ServerSettings(
        judges=[GenerativeSettings(name="gen", model=str(embedded_dir))],
        limits={"max_samples": 5},
    )
    return JudgeService(settings)


@pytest.fixture()
def gen(embedded_dir):
    from reward_server.judges import GenerativeJudge
    from tests.support import ScriptedEngine, load_tokenizer

    settings = GenerativeSettings(name="gen", model=str(embedded_dir))
    return GenerativeJudge(settings, ScriptedEngine(load_tokenizer(embedded_dir), "generate"))


def test_each_sample_costs_its_generations(gen):
    pair = PairwiseItem(prompt="Q", response_a="a", response_b="b")
    q = PairwiseQuestion(
        PairwiseRequest(items=[pair, pair], mode="cot", order="both", samples=3, max_retries=1)
    )
    assert q.cost(gen).engine_requests == 2 * 2 * 3 * 2  # items x orders x samples x (1 + retries)
    judged = CotJudgeQuestion(JudgeRequest(items=[JudgeItem(prompt="Q", response="a")], samples=4))
    assert judged.cost(gen).engine_requests == 4
    group = WinRateQuestion(WinRateRequest(prompt="Q", responses=["a", "b", "c"], mode="cot", samples=5))
    group.prepare(gen)
    assert group.cost(gen).engine_requests == 3 * 2 * 5


def test_samples_need_cot_and_stay_within_the_limit(service, gen):
    pair = PairwiseItem(prompt="Q", response_a="a", response_b="b")
    with pytest.raises(ClientError) as caught:
        PairwiseQuestion(PairwiseRequest(items=[pair], mode="logprob", samples=3)).prepare(gen)
    assert caught.value.status == 400 and "needs mode=cot" in caught.value.message
    with pytest.raises(ClientError) as caught:
        service.check_limits(PairwiseQuestion(PairwiseRequest(items=[pair], mode="cot", samples=6)))
    assert caught.value.status == 422 and "limits.max_samples" in caught.value.message
    listwise = WinRateQuestion(
        WinRateRequest(prompt="Q", responses=["a", "b"], mode="cot", schedule="listwise", samples=2)
    )
    with pytest.raises(ClientError, match="schedule=pairs"):
        listwise.prepare(gen)
