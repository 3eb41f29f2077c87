"""Reward rules of the judge service, exactly: position-bias rules for inconsistent pairs, the minimum
label mass, and Bradley-Terry on raw rewards.

The real service, judges, templates and tokenizers answer; only vLLM is replaced by a scripted engine
whose probabilities are chosen per test, so that each rule meets the case it exists for (a judge that
prefers whichever response comes first, a judge that barely answers with a label). The same rules are
checked against the real engines in ``tests/serving/test_server_routes.py``.
"""

from __future__ import annotations

import math

import pytest

from referee.protocol import (
    PairwiseItem,
    PairwiseRequest,
    ScoreItem,
    ScoreRequest,
    WinRateRequest,
)
from reward_server.judges import ClassifierJudge, ClassifierSettings, GenerativeJudge, GenerativeSettings
from reward_server.service import JudgeService
from reward_server.settings import ServerSettings
from tests.support import QUESTION, RESPONSES, ScriptedEngine, load_tokenizer


@pytest.fixture()
def harness(embedded_dir, tiny_classifier_dir):
    judges = [
        GenerativeSettings(name="gen", model=str(embedded_dir)),
        GenerativeSettings(name="gen-average", model=str(embedded_dir), inconsistent="average"),
        ClassifierSettings(name="rm-sigmoid", model=str(tiny_classifier_dir), activation="sigmoid"),
    ]
    # No judgment cache: the scripted engine answers the same input differently from test to test.
    service = JudgeService(ServerSettings(judges=judges, default_judge="gen", cache={"enabled": False}))
    gen = ScriptedEngine(load_tokenizer(embedded_dir), "generate")
    rm = ScriptedEngine(load_tokenizer(tiny_classifier_dir), "pooling")
    service.judges = {
        "gen": GenerativeJudge(judges[0], gen),
        "gen-average": GenerativeJudge(judges[1], gen),
        "rm-sigmoid": ClassifierJudge(judges[2], rm),
    }
    return service, gen, rm


def _position_biased(gen: ScriptedEngine) -> None:
    """alpha vs bravo: the judge says "the first one" in both orders (P 0.99, then 0.97): averaged,
    P(alpha better) = 0.51, which would be a win for alpha on the strength of position bias alone."""
    gen.pairs[("alpha", "bravo")] = {"A": 0.99, "B": 0.01}
    gen.pairs[("bravo", "alpha")] = {"A": 0.97, "B": 0.03}


def _pair_request(**options) -> PairwiseRequest:
    item = PairwiseItem(prompt=QUESTION, response_a=RESPONSES[0], response_b=RESPONSES[1])
    return PairwiseRequest(items=[item], **{"order": "both", **options})


# ---------------------------------------------------------------- inconsistent pairs


async def test_an_inconsistent_pair_is_a_tie_by_default(harness):
    service, gen, _ = harness
    _position_biased(gen)
    r = (await service.pairwise(_pair_request())).results[0]
    assert r.consistent is False
    assert r.verdict == "tie" and r.p_a == 0.5  # not a win for A on the strength of position bias
    assert r.inconsistent_rule == "tie"


async def test_inconsistent_average_and_drop(harness):
    service, gen, _ = harness
    _position_biased(gen)
    average = (await service.pairwise(_pair_request(inconsistent="average"))).results[0]
    assert average.p_a == pytest.approx(0.51) and average.inconsistent_rule == "average"
    assert average.verdict == "A" and average.consistent is False
    drop = (await service.pairwise(_pair_request(inconsistent="drop"))).results[0]
    assert drop.verdict == "invalid" and drop.p_a is None and drop.inconsistent_rule == "drop"
    assert "changed with the order" in drop.error


async def test_the_judges_setting_is_the_default_and_the_request_wins(harness):
    service, gen, _ = harness
    gen.pairs[("alpha", "bravo")] = {"A": 0.9, "B": 0.1}  # A (alpha) in the first order ...
    gen.pairs[("bravo", "alpha")] = {"A": 0.7, "B": 0.3}  # ... B (bravo) in the second: averaged 0.6
    r = (await service.pairwise(_pair_request(judge="gen-average"))).results[0]
    assert (r.verdict, r.inconsistent_rule) == ("A", "average") and r.p_a == pytest.approx(0.6)
    r = (await service.pairwise(_pair_request(judge="gen-average", inconsistent="tie"))).results[0]
    assert (r.verdict, r.p_a, r.inconsistent_rule) == ("tie", 0.5, "tie")


async def test_a_consistent_pair_is_left_alone(harness):
    service, gen, _ = harness
    gen.pairs[("alpha", "bravo")] = {"A": 0.9, "B": 0.1}
    gen.pairs[("bravo", "alpha")] = {"A": 0.2, "B": 0.8}
    r = (await service.pairwise(_pair_request(inconsistent="drop"))).results[0]
    assert r.consistent is True and r.inconsistent_rule is None
    assert r.verdict == "A" and r.p_a == pytest.approx(0.85)


@pytest.mark.parametrize("soft", [False, True])
async def test_winrate_counts_what_each_rule_changed(harness, soft):
    service, gen, _ = harness
    _position_biased(gen)  # alpha vs bravo flips with the order; every other pair: the first shown wins 0.9
    gen.default_pair = {"A": 0.9, "B": 0.1}
    for first, second in [("alpha", "charlie"), ("charlie", "alpha")]:
        gen.pairs[(first, second)] = {"A": 0.9, "B": 0.1} if first == "alpha" else {"A": 0.1, "B": 0.9}
    body = dict(prompt=QUESTION, responses=RESPONSES[:3], order="both", soft=soft)
    tie = await service.winrate(WinRateRequest(**body))
    assert (tie.comparisons, tie.inconsistent, tie.inconsistent_rule) == (3, 2, "tie")
    # alpha-bravo and bravo-charlie flip; alpha beats charlie in both orders
    assert tie.win_matrix[0][1] == tie.win_matrix[1][2] == 0.5
    assert tie.win_matrix[0][2] == pytest.approx(0.9 if soft else 1.0)
    assert tie.ties == 2 and tie.invalid == 0
    drop = await service.winrate(WinRateRequest(**body, inconsistent="drop"))
    assert (drop.inconsistent, drop.invalid, drop.ties) == (2, 2, 0)
    assert drop.win_matrix[0][1] is None and drop.win_matrix[1][2] is None
    assert drop.win_rates[1] is None  # bravo: both its comparisons dropped, so no reward at all
    average = await service.winrate(WinRateRequest(**body, inconsistent="average"))
    assert (average.inconsistent, average.inconsistent_rule, average.invalid) == (2, "average", 0)
    single = await service.winrate(WinRateRequest(**{**body, "order": "single"}))
    assert (single.inconsistent, single.inconsistent_rule) == (0, None)


# ---------------------------------------------------------------- minimum label mass


async def test_a_verdict_on_too_little_label_mass_is_invalid(harness):
    service, gen, _ = harness
    gen.pairs[("alpha", "bravo")] = {"A": 0.001}  # only A in the top logprobs: P(A) would be 1.0
    r = (await service.pairwise(_pair_request(order="single"))).results[0]
    assert r.verdict == "invalid" and r.p_a is None
    assert r.label_mass == pytest.approx(0.001)
    assert "0.001" in r.error and "min_label_mass" in r.error
    gen.pairs[("alpha", "bravo")] = {"A": 0.3, "B": 0.1}
    r = (await service.pairwise(_pair_request(order="single"))).results[0]
    assert r.p_a == pytest.approx(0.75) and r.label_mass == pytest.approx(0.4)


async def test_winrate_counts_low_label_mass_apart(harness):
    service, gen, _ = harness
    gen.pairs[("alpha", "bravo")] = {"A": 0.005, "B": 0.001}
    out = await service.winrate(WinRateRequest(prompt=QUESTION, responses=RESPONSES[:3], order="single"))
    assert (out.low_label_mass, out.invalid) == (1, 1)
    assert "min_label_mass" in out.errors[0]
    both = await service.pairwise(_pair_request())
    assert both.results[0].verdict == "invalid" and both.results[0].label_mass == pytest.approx(0.006)


async def test_a_rating_on_too_little_label_mass_is_invalid(harness):
    service, gen, _ = harness
    gen.ratings["alpha"] = {"2": 0.001}  # would be a confident 2
    gen.ratings["bravo"] = {"2": 0.5, "8": 0.5}
    items = [ScoreItem(prompt=QUESTION, response=r) for r in RESPONSES[:2]]
    low, ok = (await service.score(ScoreRequest(judge="gen", items=items))).results
    assert low.score is None and low.label_mass == pytest.approx(0.001)
    assert "min_label_mass" in low.error
    assert ok.score == pytest.approx(5.0) and ok.label_mass == pytest.approx(1.0)


def test_min_label_mass_zero_turns_the_check_off():
    assert GenerativeSettings(name="j", model="m").min_label_mass == 0.01
    assert GenerativeSettings(name="j", model="m", min_label_mass=0).min_label_mass == 0


# ---------------------------------------------------------------- Bradley-Terry on raw rewards


async def test_bradley_terry_compares_logits_when_scores_are_sigmoids(harness):
    service, _, rm = harness
    rm.logits.update(alpha=2.0, bravo=0.0, charlie=-1.0)
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    scores = await service.score(
        ScoreRequest(judge="rm-sigmoid", items=[ScoreItem(prompt=QUESTION, response=RESPONSES[0])])
    )
    assert scores.results[0].score == pytest.approx(sigmoid(2.0))  # the score keeps the activation
    pair = (await service.pairwise(_pair_request(judge="rm-sigmoid", order="single"))).results[0]
    assert pair.p_a == pytest.approx(sigmoid(2.0 - 0.0))  # not sigmoid(sigmoid(2) - sigmoid(0))
    out = await service.winrate(
        WinRateRequest(judge="rm-sigmoid", prompt=QUESTION, responses=RESPONSES[:3], soft=True)
    )
    assert out.scores == pytest.approx([sigmoid(2.0), sigmoid(0.0), sigmoid(-1.0)])
    assert out.win_matrix[0][2] == pytest.approx(sigmoid(3.0))
    assert out.win_matrix[1][2] == pytest.approx(sigmoid(1.0))
