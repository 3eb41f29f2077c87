"""Reward math as small pure functions: win rates, group advantages, comparison schedules.

Win rates follow Pref-GRPO (Wang et al. 2025, "Pref-GRPO: Pairwise Preference Reward-based GRPO
for Stable Text-to-Image Reinforcement Learning", arXiv:2508.20751): each response of a prompt's
group is compared with the others and its reward is the fraction of comparisons it wins, which is
harder to hack than a pointwise score. Advantages are GRPO's group z-score (Shao et al. 2024).
A group is the responses to one prompt, found by ``group_by_prompt`` wherever a batch arrives
flat (the TRL and verl adapters, OpenRLHF's ``/get_reward``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SINGLE_RESPONSE",
    "GroupTally",
    "bradley_terry",
    "bradley_terry_fit",
    "bradley_terry_win_rates",
    "circular_pairs",
    "group_advantages",
    "group_by_prompt",
    "prompt_key",
    "shape_reward",
    "tally_group",
    "verdict_credit",
    "win_rates",
]

# Why a response that is the only one to its prompt has no win rate (see group_by_prompt).
SINGLE_RESPONSE = "the only response to its prompt: there is nothing to compare it with"


def bradley_terry(r_a: float, r_b: float) -> float:
    """P(a beats b) = sigmoid(r_a - r_b) under the Bradley-Terry model, computed stably."""
    d = r_a - r_b
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


def prompt_key(prompt: Any) -> str:
    """What makes two prompts the same prompt: their JSON with keys sorted.

    Text is compared character for character, chat messages by role and content whatever the order
    of their fields, and a string never equals a number or a list (``"1"`` is not ``1``). Values
    that JSON cannot hold are compared by ``str()``.
    """
    return json.dumps(prompt, sort_keys=True, default=str)


def group_by_prompt(prompts: Sequence[Any]) -> list[list[int]]:
    """The positions of each prompt's responses in a flat batch, grouped by ``prompt_key``.

    Groups come in the order their prompts first appear, each with its positions ascending, so a
    batch whose completions of several prompts are interleaved is grouped by prompt, never by
    position.

    The one rule for a prompt with a single response: it is a group of one, and a group of one has
    no win rate (``SINGLE_RESPONSE``). It is never merged into another group and never given a
    made-up value (1/2, 0); each caller reports it as unscored in its own framework's terms:
    ``referee.trl`` returns ``None`` for it (then ``on_failure`` decides), ``referee.verl`` counts it
    as a response the judge could not score (``on_error``), and ``/get_reward?reward=winrate``
    answers 422 naming it. A pointwise reward (``score``, ``preference``) needs no group and scores it.
    """
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt_key(prompt), []).append(i)
    return list(groups.values())


def verdict_credit(verdict: str) -> float | None:
    """Credit of response A for a verdict: A wins 1, tie 1/2, B wins 0, invalid None."""
    return {"A": 1.0, "B": 0.0, "tie": 0.5}.get(verdict)


def circular_pairs(n: int, opponents: int | None = None) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, to compare in a group of n.

    All n(n-1)/2 pairs by default or when ``opponents >= n-1``. With ``opponents=k`` (k < n-1), a
    circulant schedule in which every response takes part in exactly k comparisons (none is
    favoured by the schedule), n*k/2 pairs in all: response i meets i±1..i±floor(k/2) (mod n) and,
    for odd k, its opposite i+n/2. A schedule with exactly k for everyone exists only when n*k is
    even (the comparisons count n*k/2 pairs); when n and k are both odd every response gets k
    comparisons except one that gets k+1, (n*k+1)/2 pairs in all.
    """
    if n < 2:
        raise ValueError("a group needs at least 2 responses")
    if opponents is not None and opponents < 1:
        raise ValueError("opponents must be at least 1")
    if opponents is None or opponents >= n - 1:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    k = opponents
    pairs: set[tuple[int, int]] = set()

    def add(i: int, j: int) -> None:
        i, j = i % n, j % n
        pairs.add((min(i, j), max(i, j)))

    for i in range(n):  # the ring's k//2 nearest neighbours on each side: degree 2*(k//2)
        for step in range(1, k // 2 + 1):
            add(i, i + step)
    if k % 2:  # one more opponent each, at the largest distance (never a ring neighbour above)
        half = n // 2
        for i in range(half):  # i meets i + n//2: all n responses, or n-1 of them when n is odd
            add(i, i + half)
        if n % 2:  # the one left over meets response half-1, the one that gets k+1
            add(n - 1, n - 1 + half)
    return sorted(pairs)


def win_rates(matrix: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Mean credit of each row over the comparisons that have one (None = not compared / invalid)."""
    rates: list[float | None] = []
    for i, row in enumerate(matrix):
        credits = [c for j, c in enumerate(row) if j != i and c is not None]
        rates.append(sum(credits) / len(credits) if credits else None)
    return rates


def bradley_terry_fit(
    matrix: Sequence[Sequence[float | None]], prior: float = 0.5, iterations: int = 200
) -> list[float | None]:
    """Bradley-Terry strengths (log scale, mean 0 over the compared responses) fitted to the credits
    of a group's comparisons, by Hunter's (2004) minorise-maximise iterations. ``prior`` adds that
    many virtual games, split evenly, against an average response, so that a response that won (or
    lost) all its comparisons gets a finite strength. None: a response without a valid comparison."""
    n = len(matrix)
    played = [[matrix[i][j] is not None and i != j for j in range(n)] for i in range(n)]
    active = [any(row) for row in played]
    wins = [sum(matrix[i][j] for j in range(n) if played[i][j]) + prior / 2 for i in range(n)]
    strength = [1.0] * n
    for _ in range(iterations):
        new = []
        for i in range(n):
            if not active[i]:
                new.append(1.0)
                continue
            # a comparison of i and j counts once from each side (credits c_ij + c_ji = 1)
            denom = sum(1.0 / (strength[i] + strength[j]) for j in range(n) if played[i][j])
            denom += prior / (strength[i] + 1.0)
            new.append(wins[i] / denom)
        logs = [math.log(v) for v, a in zip(new, active, strict=True) if a]
        centre = math.exp(sum(logs) / len(logs)) if logs else 1.0
        change = max(abs(a / centre - b) for a, b in zip(new, strength, strict=True))
        strength = [v / centre for v in new]
        if change < 1e-10:
            break
    return [math.log(v) if a else None for v, a in zip(strength, active, strict=True)]


def bradley_terry_win_rates(
    matrix: Sequence[Sequence[float | None]], prior: float = 0.5
) -> list[float | None]:
    """Each response's expected win rate against all the others under the Bradley-Terry fit of the
    comparisons made: a sparse schedule's estimate of the full round robin's win rates."""
    theta = bradley_terry_fit(matrix, prior)
    known = [t for t in theta if t is not None]
    rates: list[float | None] = []
    for i, t in enumerate(theta):
        if t is None or len(known) < 2:
            rates.append(None)
            continue
        others = [u for j, u in enumerate(theta) if j != i and u is not None]
        rates.append(sum(bradley_terry(t, u) for u in others) / len(others))
    return rates


def group_advantages(values: Sequence[float | None], eps: float = 1e-6) -> list[float | None]:
    """GRPO advantages: (v - mean) / (std + eps) over the group's defined values.

    A group whose values are all equal gets advantages of 0 (eps guards the division). Undefined
    values stay None: they carry no signal and must not be mistaken for an average response.
    """
    defined = [v for v in values if v is not None]
    if not defined:
        return [None for _ in values]
    mean = sum(defined) / len(defined)
    std = math.sqrt(sum((v - mean) ** 2 for v in defined) / len(defined))
    return [None if v is None else (v - mean) / (std + eps) for v in values]


@dataclass
class GroupTally:
    """A group's comparisons folded into win rates (see ``tally_group``)."""

    win_matrix: list[list[float | None]]
    win_rates: list[float | None]
    strengths: list[float | None] | None  # Bradley-Terry strengths, when that estimate was asked for
    ties: int
    invalid: int
    errors: list[str]


def tally_group(
    n: int,
    pairs: Sequence[tuple[int, int]],
    outcomes: Sequence[tuple[float | None, str, str | None]],
    *,
    soft: bool = False,
    estimate: str = "observed",
) -> GroupTally:
    """Fold the judged pairs of a group of ``n`` into its win matrix and win rates.

    ``outcomes`` are (P(first of the pair wins), verdict, error) per pair, from the first's side.
    A pair's credit is its verdict's (1, 1/2, 0), or with ``soft`` its probability; an invalid
    verdict is counted apart, named in ``errors`` and left out of the matrix, never turned into a
    tie. ``estimate``: ``observed`` (Pref-GRPO's wins / comparisons made) or ``bradley_terry`` (each
    response's expected win rate against all others under a fit of the comparisons made, for
    sparse schedules), which also returns the fitted strengths.
    """
    if len(pairs) != len(outcomes):
        raise ValueError(f"{len(pairs)} pairs but {len(outcomes)} outcomes")
    if estimate not in ("observed", "bradley_terry"):
        raise ValueError(f"unknown estimate {estimate!r}: use observed or bradley_terry")
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    ties = invalid = 0
    errors: list[str] = []
    for (i, j), (p_first, verdict, error) in zip(pairs, outcomes, strict=True):
        credit = p_first if soft else verdict_credit(verdict)
        if verdict == "invalid" or credit is None:
            invalid += 1
            errors.append(f"responses {i} vs {j}: {error or 'invalid verdict'}")
            continue
        ties += verdict == "tie"
        matrix[i][j], matrix[j][i] = credit, 1.0 - credit
    if estimate == "bradley_terry":
        rates, strengths = bradley_terry_win_rates(matrix), bradley_terry_fit(matrix)
    else:
        rates, strengths = win_rates(matrix), None
    return GroupTally(matrix, rates, strengths, ties, invalid, errors)


def shape_reward(reward: float, reference: float, transform: str) -> float:
    """A raw reward shaped against a reference reward of the same prompt.

    - ``par``: sigmoid(r - r_ref) (Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in
      RLHF", Preference As Reward): bounded in (0, 1), 1/2 at the reference, and flat far above it,
      so that a policy gains little by pushing an already-better response further into the reward
      model's extrapolation.
    - ``log_sigmoid``: log sigmoid(r - r_ref) (Wang et al. 2024, "Transforming and Combining Rewards
      for Aligning Large Language Models"): at most 0, near 0 once r beats the reference and linear
      in r far below it, so that a sum of shaped rewards from several judges is high only when each
      term is ("good on all"), not when one huge term hides a failing one.
    - ``none``: the raw reward.
    """
    if transform == "none":
        return reward
    x = reward - reference
    if transform == "par":
        return bradley_terry(reward, reference)
    if transform == "log_sigmoid":
        # log sigmoid(x) = -log(1 + e^-x), computed without overflow for large |x|
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
    raise ValueError(f"unknown transform {transform!r}: use none, par or log_sigmoid")
