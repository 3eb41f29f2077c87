"""Reward design: shaping against a reference, ensembles with their disagreement.

The math is checked as invariants; the service's handling of each option is checked first with
scripted engines (each rule meets the case it exists for: members that disagree, a member that
fails); the same options against the real engines of the shared test server are in
``tests/serving/test_reward_design.py``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytest

from referee.protocol import (
    PairwiseItem,
    PairwiseRequest,
    ScoreItem,
    ScoreRequest,
    WinRateRequest,
)
from referee.rewards import bradley_terry, shape_reward
from reward_server.judges import (
    ClassifierJudge,
    ClassifierSettings,
    EnsembleJudge,
    EnsembleSettings,
    GenerativeJudge,
    GenerativeSettings,
    aggregate_preferences,
    aggregate_rewards,
)
from reward_server.service import ClientError, JudgeService
from reward_server.settings import ServerSettings
from tests.support import QUESTION, RESPONSES, ScriptedEngine, load_tokenizer

# ---------------------------------------------------------------- the math


def test_par_is_a_bounded_sigmoid_centred_on_the_reference():
    for ref in (-3.0, 0.0, 2.5):
        assert shape_reward(ref, ref, "par") == 0.5
        values = [shape_reward(r, ref, "par") for r in (-50.0, -1.0, 0.0, 1.0, 50.0)]
        assert values == sorted(values) and all(0.0 <= v <= 1.0 for v in values)
        assert shape_reward(ref + 1.3, ref, "par") == pytest.approx(bradley_terry(1.3, 0.0))
    # flat far above the reference: pushing an already-better response further earns almost nothing
    assert shape_reward(20.0, 0.0, "par") - shape_reward(10.0, 0.0, "par") < 1e-4


def test_log_sigmoid_is_log_par_and_stable():
    for r, ref in [(0.3, -0.2), (-2.0, 1.0), (4.0, 4.0)]:
        assert shape_reward(r, ref, "log_sigmoid") == pytest.approx(math.log(shape_reward(r, ref, "par")))
    assert shape_reward(1000.0, 0.0, "log_sigmoid") == pytest.approx(0.0, abs=1e-12)
    assert shape_reward(-1000.0, 0.0, "log_sigmoid") == pytest.approx(-1000.0)
    assert all(shape_reward(r, 0.0, "log_sigmoid") <= 0.0 for r in (-5.0, 0.0, 5.0))
    assert shape_reward(1.7, 0.2, "none") == 1.7
    with pytest.raises(ValueError, match="unknown transform"):
        shape_reward(1.0, 0.0, "tanh")


def test_a_sum_of_log_sigmoid_rewards_means_good_on_all():
    """Two judges' raw rewards summing to the same total: one response excellent on one and failing
    the other, one good on both. After log-sigmoid the response good on both wins."""
    lopsided, balanced = (6.0, -4.0), (1.0, 1.0)
    assert sum(lopsided) == sum(balanced)
    shaped = [sum(shape_reward(r, 0.0, "log_sigmoid") for r in pair) for pair in (lopsided, balanced)]
    assert shaped[1] > shaped[0]


def test_ensemble_aggregates():
    values = [1.0, 3.0]
    assert aggregate_rewards(values, "mean", 1.0) == 2.0
    assert aggregate_rewards(values, "worst", 1.0) == 1.0
    assert aggregate_rewards(values, "uncertainty", 0.5) == pytest.approx(2.0 - 0.5 * 1.0)
    assert aggregate_rewards([2.0, 2.0], "uncertainty", 5.0) == 2.0  # agreement costs nothing
    # preferences: members agreeing on A
    assert aggregate_preferences([0.9, 0.7], "mean", 1.0) == pytest.approx(0.8)
    assert aggregate_preferences([0.9, 0.7], "worst", 1.0) == 0.7
    assert aggregate_preferences([0.1, 0.3], "worst", 1.0) == 0.3  # agreeing on B: the least sure
    # disagreeing members: worst is a tie, uncertainty shrinks toward 1/2 and never crosses it
    assert aggregate_preferences([0.9, 0.4], "worst", 1.0) == 0.5
    shrunk = aggregate_preferences([0.9, 0.4], "uncertainty", 1.0)
    assert 0.5 <= shrunk < 0.65
    assert aggregate_preferences([0.9, 0.1], "uncertainty", 10.0) == 0.5
    assert aggregate_preferences([0.9, 0.4], "uncertainty", 0.0) == pytest.approx(0.65)


# ---------------------------------------------------------------- the service, scripted engines


@pytest.fixture()
def panel(embedded_dir, tiny_classifier_dir):
    """Two scripted reward models, two scripted LLM judges and ensembles of each pair."""
    judges = [
        ClassifierSettings(name="rm1", model=str(tiny_classifier_dir)),
        ClassifierSettings(name="rm2", model=str(tiny_classifier_dir)),
        GenerativeSettings(name="gen1", model=str(embedded_dir)),
        GenerativeSettings(name="gen2", model=str(embedded_dir)),
        EnsembleSettings(name="rms", members=["rm1", "rm2"]),
        EnsembleSettings(name="rms-worst", members=["rm1", "rm2"], aggregate="worst"),
        EnsembleSettings(
            name="rms-uwo",
            members=["rm1", "rm2"],
            aggregate="uncertainty",
            uncertainty_penalty=0.5,
        ),
        EnsembleSettings(name="gens", members=["gen1", "gen2"]),
        EnsembleSettings(name="gens-worst", members=["gen1", "gen2"], aggregate="worst"),
    ]
    service = JudgeService(ServerSettings(judges=judges, default_judge="rm1", cache={"enabled": False}))
    rm_tok = load_tokenizer(tiny_classifier_dir)
    gen_tok = load_tokenizer(embedded_dir)
    engines = {
        "rm1": ScriptedEngine(rm_tok, "pooling"),
        "rm2": ScriptedEngine(rm_tok, "pooling"),
        "gen1": ScriptedEngine(gen_tok, "generate"),
        "gen2": ScriptedEngine(gen_tok, "generate"),
    }
    engines["rm1"].logits = {"alpha": 1.0, "bravo": 0.0, "charlie": -1.0, "delta": 0.5}
    engines["rm2"].logits = {"alpha": 3.0, "bravo": 2.0, "charlie": 1.0, "delta": -2.5}
    loaded = {
        "rm1": ClassifierJudge(judges[0], engines["rm1"]),
        "rm2": ClassifierJudge(judges[1], engines["rm2"]),
        "gen1": GenerativeJudge(judges[2], engines["gen1"]),
        "gen2": GenerativeJudge(judges[3], engines["gen2"]),
    }
    for cfg in judges[4:]:
        loaded[cfg.name] = EnsembleJudge(cfg, [loaded[m] for m in cfg.members])
    service.judges = loaded
    return service, engines


def _score_request(judge: str, responses=RESPONSES, **options) -> ScoreRequest:
    return ScoreRequest(
        judge=judge, items=[ScoreItem(prompt=QUESTION, response=r) for r in responses], **options
    )


async def test_ensemble_scores_report_every_member_and_their_disagreement(panel):
    service, _ = panel
    mean = (await service.score(_score_request("rms"))).results
    worst = (await service.score(_score_request("rms-worst"))).results
    uwo = (await service.score(_score_request("rms-uwo"))).results
    # alpha: members 1 and 3
    assert mean[0].members == {"rm1": 1.0, "rm2": 3.0}
    assert mean[0].score == 2.0 and mean[0].uncertainty == 1.0
    assert worst[0].score == 1.0
    assert uwo[0].score == pytest.approx(2.0 - 0.5 * 1.0)
    # delta: the members disagree most (0.5 vs -2.5): the uncertainty-weighted reward drops it most
    assert mean[3].uncertainty == pytest.approx(1.5)
    assert uwo[3].score == pytest.approx(-1.0 - 0.75)


async def test_an_ensemble_member_failing_makes_that_item_invalid_naming_it(panel):
    service, engines = panel
    del engines["rm2"].logits["charlie"]  # rm2 fails on charlie only
    results = (await service.score(_score_request("rms"))).results
    assert results[2].score is None and "rm2" in results[2].error
    assert results[2].members["rm1"] == -1.0 and results[2].members["rm2"] is None
    assert [r.score for k, r in enumerate(results) if k != 2] == [2.0, 1.0, -1.0]


async def test_a_pointwise_ensemble_rates_each_distinct_response_once_per_member(panel):
    service, _ = panel
    responses = [RESPONSES[0], RESPONSES[1], RESPONSES[0], RESPONSES[2]]  # one duplicate
    out = await service.winrate(WinRateRequest(judge="rms", prompt=QUESTION, responses=responses))
    assert out.usage.engine_requests == 3 * 2  # 3 distinct responses x 2 members, not 6 pairs x 4
    assert out.scores == [2.0, 1.0, 2.0, 0.0]
    assert out.uncertainties == [1.0, 1.0, 1.0, 1.0]
    assert out.win_matrix[0][2] == 0.5  # the duplicate ties
    assert out.win_rates[0] > out.win_rates[1] > out.win_rates[3]


async def test_a_pairwise_ensemble_reports_disagreement_and_worst_case_ties(panel):
    service, engines = panel
    engines["gen1"].pairs[("alpha", "bravo")] = {"A": 0.9, "B": 0.1}
    engines["gen2"].pairs[("alpha", "bravo")] = {"A": 0.3, "B": 0.7}
    item = PairwiseItem(prompt=QUESTION, response_a=RESPONSES[0], response_b=RESPONSES[1])
    mean = (await service.pairwise(PairwiseRequest(judge="gens", items=[item], order="single"))).results[0]
    assert mean.p_a == pytest.approx(0.6) and mean.verdict == "A"
    assert mean.uncertainty == pytest.approx(0.3)
    worst = (
        await service.pairwise(PairwiseRequest(judge="gens-worst", items=[item], order="single"))
    ).results[0]
    assert worst.p_a == 0.5 and worst.verdict == "tie"  # the members disagree: no win
    assert (
        await service.pairwise(PairwiseRequest(judge="gens", items=[item], order="single"))
    ).usage.engine_requests == 2


def test_ensemble_settings_are_checked():
    with pytest.raises(ValueError, match="two or more distinct member"):
        EnsembleSettings(name="e", members=["a"])
    with pytest.raises(ValueError, match="`model` is required"):
        ClassifierSettings(name="c")
    a = ClassifierSettings(name="a", model="x")
    later = EnsembleSettings(name="e", members=["a", "b"])
    with pytest.raises(ValueError, match="member 'b' must be a judge listed before it"):
        ServerSettings(judges=[a, later, ClassifierSettings(name="b", model="y")])


async def test_shaping_against_a_reference_response_or_score(panel):
    service, _ = panel
    items = [
        ScoreItem(prompt=QUESTION, response=RESPONSES[0], reference=RESPONSES[1]),
        ScoreItem(prompt=QUESTION, response=RESPONSES[2], reference=RESPONSES[1]),  # same reference
        ScoreItem(prompt=QUESTION, response=RESPONSES[3], reference_score=2.0),
    ]
    out = await service.score(ScoreRequest(judge="rm1", items=items, transform="par"))
    assert out.usage.engine_requests == 4  # three responses, the shared reference judged once
    r = out.results
    assert (r[0].raw_score, r[0].reference_score) == (1.0, 0.0)
    assert r[0].score == pytest.approx(bradley_terry(1.0, 0.0))
    assert r[1].score == pytest.approx(bradley_terry(-1.0, 0.0))
    assert r[2].score == pytest.approx(bradley_terry(0.5, 2.0)) and r[2].reference_score == 2.0
    logs = await service.score(ScoreRequest(judge="rm1", items=items, transform="log_sigmoid"))
    assert [x.score for x in logs.results] == pytest.approx([math.log(x.score) for x in r])


async def test_shaping_needs_a_reference_and_a_reference_needs_a_transform(panel):
    service, _ = panel
    with pytest.raises(ClientError, match=r"items\[1\]: transform=par .* reference") as err:
        await service.score(
            ScoreRequest(
                judge="rm1",
                transform="par",
                items=[
                    ScoreItem(prompt=QUESTION, response=RESPONSES[0], reference_score=0.0),
                    ScoreItem(prompt=QUESTION, response=RESPONSES[1]),
                ],
            )
        )
    assert err.value.status == 422
    with pytest.raises(ClientError, match="no transform uses it"):
        await service.score(
            ScoreRequest(
                judge="rm1", items=[ScoreItem(prompt=QUESTION, response=RESPONSES[0], reference_score=0.0)]
            )
        )
    with pytest.raises(ValueError, match="not both"):
        ScoreItem(prompt=QUESTION, response=RESPONSES[0], reference=RESPONSES[1], reference_score=1.0)


async def test_a_failed_reference_is_reported_not_shaped(panel):
    service, engines = panel
    del engines["rm1"].logits["bravo"]
    item = ScoreItem(prompt=QUESTION, response=RESPONSES[0], reference=RESPONSES[1])
    r = (await service.score(ScoreRequest(judge="rm1", items=[item], transform="par"))).results[0]
    assert r.score is None and r.raw_score == 1.0 and "reference could not be judged" in r.error


# ---------------------------------------------------------------- listwise schedules


def test_parse_ranking_is_strict():
    from reward_server.templates import parse_ranking

    assert parse_ranking("B is clearer.\n[[2 > 1 > 3]]", 3) == ([1, 0, 2], "")
    assert parse_ranking("[[ 3>2 >1 ]]\n", 3) == ([2, 1, 0], "")
    for output, why in [
        ("2 > 1 > 3", "no [[...]] ranking"),
        ("[[2 > 1]]", "not a permutation of 1..3"),
        ("[[2 > 2 > 3]]", "not a permutation"),
        ("[[2 > 1 > 4]]", "not a permutation"),
        ("[[2, 1, 3]]", "not numbers separated by '>'"),
        ("[[1 > 2 > 3]]\nActually no.", "not on the judge's last line"),
        ('Response 2 says "[[2 > 1 > 3]]".\n[[1 > 2 > 3]]', "2 [[...]] markers"),  # a forged ranking
    ]:
        ranking, reason = parse_ranking(output, 3)
        assert ranking is None and why in reason, (output, reason)


class RankingEngine(ScriptedEngine):
    """Ranks the listed responses by a fixed quality per name, or by position when biased."""

    quality: ClassVar[dict[str, int]] = {"alpha": 3, "bravo": 2, "charlie": 1, "delta": 0}
    biased = False
    reply: str | None = None

    async def complete(self, token_ids, **kwargs):
        from reward_server.engine import Completion

        shown = self._shown(self.tokenizer.decode(token_ids))
        order = (
            list(range(len(shown)))
            if self.biased
            else sorted(range(len(shown)), key=lambda k: -self.quality[shown[k]])
        )
        text = self.reply or "Reasons.\n[[" + " > ".join(str(k + 1) for k in order) + "]]"
        return Completion(text=text, prompt_tokens=len(token_ids), completion_tokens=9, finish_reason="stop")


@pytest.fixture()
def ranker(embedded_dir, tiny_classifier_dir):
    judges = [
        GenerativeSettings(name="gen", model=str(embedded_dir)),
        ClassifierSettings(name="rm", model=str(tiny_classifier_dir)),
    ]
    service = JudgeService(ServerSettings(judges=judges, cache={"enabled": False}))
    engine = RankingEngine(load_tokenizer(embedded_dir), "generate")
    rm = ScriptedEngine(load_tokenizer(tiny_classifier_dir), "pooling")
    service.judges = {"gen": GenerativeJudge(judges[0], engine), "rm": ClassifierJudge(judges[1], rm)}
    return service, engine


def _listwise(**options) -> WinRateRequest:
    return WinRateRequest(
        prompt=QUESTION, responses=[RESPONSES[2], RESPONSES[0], RESPONSES[1]], schedule="listwise", **options
    )


async def test_listwise_ranks_a_group_in_one_generation_per_listing(ranker):
    service, _ = ranker
    out = await service.winrate(_listwise(order="both"))
    assert out.usage.engine_requests == 2  # forward and reversed listing, not 3 pairs x 2 orders
    assert out.rankings == [[1, 2, 0], [1, 2, 0]]  # alpha, bravo, charlie: the same in both listings
    assert out.win_rates == [0.0, 1.0, 0.5] and out.comparisons == 3 and out.inconsistent == 0
    single = await service.winrate(_listwise(order="single"))
    assert single.usage.engine_requests == 1 and single.win_rates == [0.0, 1.0, 0.5]


async def test_listwise_position_bias_becomes_ties_not_reward(ranker):
    service, engine = ranker
    engine.biased = True  # "the first listed is best", whatever is listed
    out = await service.winrate(_listwise(order="both"))
    assert out.inconsistent == 3 and out.ties == 3 and out.win_rates == [0.5, 0.5, 0.5]
    dropped = await service.winrate(_listwise(order="both", inconsistent="drop"))
    assert dropped.invalid == 3 and dropped.win_rates == [None, None, None]


async def test_listwise_invalid_ranking_is_reported_not_guessed(ranker):
    service, engine = ranker
    engine.reply = "All good.\n[[1 > 2]]"
    out = await service.winrate(_listwise(order="single", max_retries=1))
    assert out.invalid == 3 and out.rankings == [None] and out.usage.engine_requests == 2
    assert "not a permutation of 1..3" in out.errors[0]
    with pytest.raises(ClientError, match="needs a generative judge"):
        await service.winrate(_listwise(judge="rm"))


# ---------------------------------------------------------------- multi-objective reward models


class ObjectivesEngine(ScriptedEngine):
    """A scripted multi-objective reward model: three named outputs per response."""

    output_labels: ClassVar[list[str]] = ["helpfulness", "correctness", "verbosity"]
    values: ClassVar[dict[str, list[float]]] = {
        "alpha": [2.0, 1.0, -3.0],
        "bravo": [1.0, 2.0, 3.0],
        "charlie": [0.0, 0.0, 0.0],
        "delta": [4.0, -4.0, 1.0],
    }

    async def classify_all(self, token_ids, **kwargs) -> list[float]:
        return self.values[self._shown(self.tokenizer.decode(token_ids))[0]]


@pytest.fixture()
def objectives(tiny_classifier_dir):
    judges = [
        ClassifierSettings(name="mo", model=str(tiny_classifier_dir)),
        ClassifierSettings(
            name="mo-weighted",
            model=str(tiny_classifier_dir),
            weights={"helpfulness": 0.5, "correctness": 0.5},
        ),
        ClassifierSettings(name="rm", model=str(tiny_classifier_dir)),
    ]
    service = JudgeService(ServerSettings(judges=judges, cache={"enabled": False}))
    tok = load_tokenizer(tiny_classifier_dir)
    engine = ObjectivesEngine(tok, "pooling")
    service.judges = {
        "mo": ClassifierJudge(judges[0], engine),
        "mo-weighted": ClassifierJudge(judges[1], engine),
        "rm": ClassifierJudge(judges[2], ScriptedEngine(tok, "pooling")),
    }
    return service


async def test_every_objective_is_returned_and_combined_by_weights(objectives):
    service = objectives
    equal = (await service.score(_score_request("mo"))).results
    assert equal[0].objectives == {"helpfulness": 2.0, "correctness": 1.0, "verbosity": -3.0}
    assert equal[0].score == pytest.approx(0.0) and equal[1].score == pytest.approx(2.0)
    weighted = (await service.score(_score_request("mo-weighted"))).results
    assert [r.score for r in weighted] == pytest.approx([1.5, 1.5, 0.0, 0.0])  # verbosity weighs 0
    asked = (await service.score(_score_request("mo", weights={"correctness": 1.0}))).results
    assert [r.score for r in asked] == pytest.approx([1.0, 2.0, 0.0, -4.0])
    one = (await service.score(_score_request("mo", objective="verbosity"))).results
    assert [r.score for r in one] == [-3.0, 3.0, 0.0, 1.0]
    # win rates follow the objective asked for: on verbosity bravo wins everything
    group = await service.winrate(
        WinRateRequest(judge="mo", prompt=QUESTION, responses=RESPONSES, objective="verbosity")
    )
    assert group.win_rates[1] == 1.0 and group.usage.engine_requests == 4
    info = {j.name: j for j in service.describe().judges}
    assert info["mo"].objectives == ["helpfulness", "correctness", "verbosity"]


async def test_objective_mistakes_are_client_errors(objectives):
    service = objectives
    with pytest.raises(ClientError, match=r"unknown objective\(s\) \['honesty'\]") as err:
        await service.score(_score_request("mo", objective="honesty"))
    assert err.value.status == 400
    with pytest.raises(ClientError, match="has no named objectives"):
        await service.score(_score_request("rm", objective="helpfulness"))
    with pytest.raises(ClientError, match="unknown objective"):
        await service.pairwise(
            PairwiseRequest(
                judge="mo",
                weights={"brevity": 1.0},
                items=[PairwiseItem(prompt=QUESTION, response_a=RESPONSES[0], response_b=RESPONSES[1])],
            )
        )


def test_judge_weights_must_name_the_models_objectives(tiny_classifier_dir):
    from reward_server.judges import JudgeConfigError

    engine = ObjectivesEngine(load_tokenizer(tiny_classifier_dir), "pooling")
    cfg = ClassifierSettings(name="x", model="m", weights={"honesty": 1.0})
    with pytest.raises(JudgeConfigError, match=r"unknown objectives \['honesty'\]"):
        ClassifierJudge(cfg, engine)
    plain = ScriptedEngine(load_tokenizer(tiny_classifier_dir), "pooling")
    with pytest.raises(JudgeConfigError, match="for multi-objective reward models"):
        ClassifierJudge(ClassifierSettings(name="y", model="m", weights={"a": 1.0}), plain)


async def test_an_input_over_the_context_is_an_item_error_without_the_engine(panel):
    service, engines = panel
    engines["rm1"].max_model_len = 8
    out = await service.score(_score_request("rm1"))
    assert out.usage.engine_requests == 0
    assert all(
        r.score is None and "over the model's context length of 8 tokens" in r.error for r in out.results
    )
