"""Reward math: invariants of win rates, advantages and comparison schedules."""

import itertools
import math
import random

import pytest

from referee.rewards import bradley_terry, circular_pairs, group_advantages, verdict_credit, win_rates


def _round_robin(n: int, rng: random.Random, tie_rate: float = 0.2) -> list[list[float | None]]:
    m: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        c = 0.5 if rng.random() < tie_rate else float(rng.random() < 0.5)
        m[i][j], m[j][i] = c, 1.0 - c
    return m


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_round_robin_win_rates_sum_to_half_the_group(n):
    rng = random.Random(n)
    for _ in range(20):
        rates = win_rates(_round_robin(n, rng))
        assert math.isclose(sum(rates), n / 2)
        assert all(0.0 <= r <= 1.0 for r in rates)


def test_ties_count_half_to_each_side():
    m = [[None, 0.5], [0.5, None]]
    assert win_rates(m) == [0.5, 0.5]


def test_permuting_the_group_permutes_the_win_rates():
    rng = random.Random(0)
    n = 6
    m = _round_robin(n, rng)
    perm = list(range(n))
    rng.shuffle(perm)
    permuted = [[m[perm[i]][perm[j]] for j in range(n)] for i in range(n)]
    assert win_rates(permuted) == [win_rates(m)[perm[i]] for i in range(n)]


def test_invalid_comparisons_are_left_out_not_counted_as_ties():
    m = [[None, 1.0, None], [0.0, None, None], [None, None, None]]
    assert win_rates(m) == [1.0, 0.0, None]


def test_advantages_are_group_z_scores():
    adv = group_advantages([1.0, 0.0, 0.5, 0.5])
    assert math.isclose(sum(adv), 0.0, abs_tol=1e-9)
    assert adv[0] > adv[2] > adv[1]
    std = math.sqrt(sum(a * a for a in adv) / 4)
    assert math.isclose(std, 1.0, rel_tol=1e-4)


def test_equal_group_has_zero_advantages_and_undefined_stays_undefined():
    assert group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]
    assert group_advantages([1.0, None, 0.0])[1] is None
    assert group_advantages([None, None]) == [None, None]


def test_bradley_terry():
    assert bradley_terry(0.0, 0.0) == 0.5
    assert math.isclose(bradley_terry(2.0, 1.0), 1 / (1 + math.exp(-1)))
    assert math.isclose(bradley_terry(1.0, 3.0) + bradley_terry(3.0, 1.0), 1.0)
    assert bradley_terry(1000.0, -1000.0) == 1.0  # no overflow
    assert bradley_terry(-1000.0, 1000.0) == 0.0


def test_verdict_credit():
    assert [verdict_credit(v) for v in ("A", "B", "tie", "invalid")] == [1.0, 0.0, 0.5, None]


@pytest.mark.parametrize("n", [2, 3, 6, 9])
def test_all_pairs_by_default(n):
    pairs = circular_pairs(n)
    assert pairs == list(itertools.combinations(range(n), 2))


@pytest.mark.parametrize("n", range(2, 34))
def test_k_opponents_gives_each_response_k_comparisons(n):
    """opponents=k: k comparisons per response (n*k/2 pairs), never 2k. Exactly k for every response
    is impossible when n and k are both odd (n*k/2 is not whole): then one response gets k+1."""
    for k in range(1, n + 2):
        pairs = circular_pairs(n, k)
        assert len(set(pairs)) == len(pairs)
        assert all(0 <= i < j < n for i, j in pairs)
        counts = sorted(sum(i in p for p in pairs) for i in range(n))
        kk = min(k, n - 1)  # k >= n-1: the full round robin
        if n * kk % 2 == 0:
            assert counts == [kk] * n, (n, k)
            assert len(pairs) == n * kk // 2
        else:
            assert counts == [kk] * (n - 1) + [kk + 1], (n, k)
            assert len(pairs) == (n * kk + 1) // 2


def test_k_opponents_rejects_zero():
    with pytest.raises(ValueError):
        circular_pairs(5, 0)


def test_group_of_one_is_rejected():
    with pytest.raises(ValueError):
        circular_pairs(1)
