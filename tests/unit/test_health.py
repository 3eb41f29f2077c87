"""Judge health (referee.health, reward_server.health): scripted judges with known behaviour give
the figures and warnings they should, through the real pipeline (JudgeService) and its store."""

from __future__ import annotations

import itertools
import random

import pytest

from referee.health import (
    Tally,
    build_report,
    field,
    figures,
    parse_fields,
    spearman,
    tally_answer,
    warnings_for,
)
from referee.protocol import (
    PairwiseItem,
    PairwiseRequest,
    ScoreItem,
    ScoreRequest,
    WinRateRequest,
)
from reward_server.health import HealthStore
from reward_server.judges import ClassifierJudge, GenerativeJudge
from reward_server.judges.classifier import ClassifierSettings
from reward_server.judges.generative import GenerativeSettings
from reward_server.service import JudgeService
from reward_server.settings import HealthSettings, ServerSettings
from tests.support import QUESTION, ScriptedEngine, load_tokenizer

# Four responses of growing length, named (last word) so the scripted engine knows which it is shown.
GROWING = ["alpha.", "It is bravo.", "It is surely charlie.", "It is most surely and clearly delta."]
NAMES = ["alpha", "bravo", "charlie", "delta"]


@pytest.fixture()
def judges(embedded_dir, tiny_classifier_dir):
    settings = [
        GenerativeSettings(name="gen", model=str(embedded_dir)),
        ClassifierSettings(name="rm", model=str(tiny_classifier_dir)),
    ]
    service = JudgeService(ServerSettings(judges=settings, default_judge="gen", cache={"enabled": False}))
    gen = ScriptedEngine(load_tokenizer(embedded_dir), "generate")
    rm = ScriptedEngine(load_tokenizer(tiny_classifier_dir), "pooling")
    service.judges = {"gen": GenerativeJudge(settings[0], gen), "rm": ClassifierJudge(settings[1], rm)}
    return service, gen, rm


async def _groups(service, n: int, **options) -> None:
    for k in range(n):
        await service.winrate(
            WinRateRequest(judge="gen", prompt=f"{QUESTION} ({k})", responses=GROWING, **options),
            tenant="team-a",
            job="job-1",
        )


async def test_a_judge_that_always_answers_a_is_reported_as_position_bias_and_an_empty_reward(judges):
    service, gen, _ = judges
    gen.default_pair = {"A": 0.9, "B": 0.1}  # whatever it is shown, the first wins
    await _groups(service, 5, order="both")
    report = await service.health.report("team-a", "job-1")
    (section,) = report.judges
    t = section.totals
    assert (
        (section.judge, section.route) == ("gen", "winrate")
        and t.comparisons == 30
        and t.both_order_comparisons == 30
    )
    assert t.order_flip_rate == 1.0 and t.tie_rate == 1.0  # every pair flipped, and became a tie
    assert t.groups == 5 and t.flat_group_rate == 1.0
    text = " ".join(section.warnings)
    assert "the reward is empty" in text and "100 % of comparisons flip with the order" in text
    assert report.warnings[0].startswith("gen /winrate: ")
    # in one order only, the same judge shows as the first position winning every comparison
    await _groups(service, 5, order="single")
    single = (await service.health.report("team-a", "job-1")).judges[0]
    assert single.totals.first_position_win_rate is None  # /winrate does not say who was shown first
    pairs = PairwiseRequest(
        judge="gen",
        items=[
            PairwiseItem(prompt=QUESTION, response_a=a, response_b=b)
            for a, b in itertools.permutations(GROWING, 2)
        ],
        order="single",
    )
    await service.pairwise(pairs, tenant="team-a", job="job-2")
    await service.pairwise(pairs, tenant="team-a", job="job-2")
    section = (await service.health.report("team-a", "job-2")).judges[0]
    assert section.totals.first_position_win_rate == 1.0
    assert any("the response shown first wins 100 %" in w for w in section.warnings)


def _prefers_longer(gen: ScriptedEngine, p: float = 0.9) -> None:
    for (i, a), (j, b) in itertools.permutations(enumerate(NAMES), 2):
        gen.pairs[(a, b)] = {"A": p, "B": 1 - p} if i > j else {"A": 1 - p, "B": p}


async def test_a_judge_that_prefers_the_longer_response_is_reported_as_length_bias(judges):
    service, gen, _ = judges
    _prefers_longer(gen)
    await _groups(service, 5, order="both")
    section = (await service.health.report("team-a", "job-1")).judges[0]
    t = section.totals
    assert t.order_flip_rate == 0.0 and t.tie_rate == 0.0 and t.flat_group_rate == 0.0
    assert t.longer_win_rate == 1.0 and t.length_reward_correlation == 1.0
    assert [w for w in section.warnings if "length" in w] and not [
        w for w in section.warnings if "empty" in w
    ]


async def test_a_consistent_noisy_judge_gets_no_warning(judges):
    service, gen, _ = judges
    rng = random.Random(7)
    for k in range(6):
        # a new preference per group, the same in both orders: signal, no position, no length
        order = rng.sample(NAMES, 4)
        for a, b in itertools.permutations(NAMES, 2):
            p = rng.uniform(0.6, 0.95)
            gen.pairs[(a, b)] = (
                {"A": p, "B": 1 - p} if order.index(a) < order.index(b) else {"A": 1 - p, "B": p}
            )
        await service.winrate(
            WinRateRequest(judge="gen", prompt=f"Q{k}", responses=GROWING, order="both"),
            tenant="team-a",
            job="job-1",
        )
    section = (await service.health.report("team-a", "job-1")).judges[0]
    assert section.totals.order_flip_rate == 0.0 and section.totals.flat_group_rate == 0.0
    assert section.warnings == []


async def test_pointwise_scores_that_differ_by_prompt_only_are_flagged(judges):
    service, _, rm = judges
    rm.logits = {"alpha": 0.0, "bravo": 0.001, "charlie": -0.001, "delta": 0.0005}
    for k in range(5):
        rm.logits = {n: v + 10 * k for n, v in rm.logits.items()}  # the prompt moves every score
        req = ScoreRequest(judge="rm", items=[ScoreItem(prompt=f"Q{k}", response=r) for r in GROWING])
        await service.score(req, tenant="team-a", job="job-1")
    section = (await service.health.report("team-a", "job-1", judge="rm")).judges[0]
    assert section.route == "score"
    assert section.totals.groups == 5 and section.totals.within_group_share < 0.01
    assert any("between prompts than between responses" in w for w in section.warnings)
    # the same job's win rates from another judge: a section of their own, scores and win rates apart
    await _groups(service, 1, order="both")
    sections = (await service.health.report("team-a", "job-1")).judges
    assert [(s.judge, s.route) for s in sections] == [("gen", "winrate"), ("rm", "score")]
    assert sections[0].totals.mean_reward == 0.5 and sections[1].totals.rewards == 20


async def test_reports_are_per_tenant_and_job(judges):
    service, gen, _ = judges
    gen.default_pair = {"A": 0.9, "B": 0.1}
    await _groups(service, 1, order="both")
    assert (await service.health.report("team-b", "job-1")).judges == []
    assert (await service.health.report("team-a", "job-9")).judges == []
    assert (await service.health.report("team-a")).judges[0].totals.comparisons == 6  # all its jobs


def test_the_store_keeps_bounded_jobs_and_windows():
    store = HealthStore(HealthSettings(window_s=10, windows=3, max_jobs=2))
    t = Tally(pairs=1, pairs_tie=1)
    for job in ("a", "b", "c"):
        store.add("t", job, "gen", "winrate", t, now=100.0)
    assert [job for _, job in store._book] == ["b", "c"]  # the least recent job went
    for now in (100.0, 110.0, 120.0, 130.0, 140.0):
        store.add("t", "c", "gen", "winrate", t, now=now)
    assert sorted(store._book[("t", "c")]) == [120, 130, 140]


def test_windows_show_drift_towards_length():
    early, late = Tally(), Tally()
    for t, won in ((early, 10), (late, 19)):
        t.update(
            pairs=20, pairs_by_length=20, pairs_longer_won=won, lengths=40, lengths_sum=40 * (50 + 5 * won)
        )
    report = build_report({0: {"gen": early}, 300: {"gen": late}}, tenant="t", job="j", window_s=300)
    (section,) = report.judges
    assert [w.longer_win_rate for w in section.windows] == [0.5, 0.95]
    assert any(
        w.startswith("drift: the longer response's share of wins rose from 50 % to 95 %")
        for w in section.warnings
    )


def test_the_redis_form_round_trips_and_skips_foreign_fields():
    raw = {
        field("gen|v2", "pairs", 300): "4",
        field("gen|v2", "pairs_tie", 300): "1.0",
        "300|x|nope": "1",
        "junk": "2",
    }
    assert parse_fields(raw) == {300: {"gen|v2": Tally(pairs=4.0, pairs_tie=1.0)}}


def test_spearman_handles_ties_and_constants():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None


def test_no_warning_without_enough_evidence():
    t = Tally(
        pairs=4, pairs_tie=4, pairs_both=4, pairs_flipped=4, groups=2, groups_flat=2, rewards=8, rewards_sum=4
    )
    assert warnings_for(t, figures(t)) == []


def test_only_native_answers_are_tallied():
    assert tally_answer(object(), object()) is None
