"""Evaluate a pairwise judge on human preference pairs (``prompt``, ``chosen``, ``rejected``).

Each pair is shown with the human-preferred response as A for half of the pairs and as B for the
other half (seeded), so a judge that always says "A" scores 50%, not 100%. Accuracy counts ties as
half right (the usual convention for preference benchmarks) and reports ties and invalid verdicts
apart; position consistency is the share of pairs whose two orders agreed (``order=both``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .client import AsyncReferee
from .protocol import PairwiseItem, PairwiseRequest, PairwiseResult


@dataclass
class PreferencePair:
    id: str
    prompt: str
    chosen: str
    rejected: str


@dataclass
class EvalReport:
    judge: str
    mode: str
    order: str
    pairs: int
    correct: int
    wrong: int
    ties: int
    invalid: int
    accuracy: float | None  # (correct + ties/2) / valid pairs; None when no verdict was valid
    strict_accuracy: float  # correct / all pairs, invalid ones included
    position_consistency: float | None
    mean_p_chosen: float | None
    seconds: float
    pairs_per_second: float
    confusion: dict[str, dict[str, int]]  # shown position of the chosen response -> verdict counts
    engine_requests: int = 0  # what the server's usage reported, summed over the requests
    cached: int = 0  # engine requests the judgment cache answered instead

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def load_pairs(path: Path | str, limit: int | None = None) -> list[PreferencePair]:
    pairs = []
    with open(path) as f:
        for k, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"prompt", "chosen", "rejected"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{k + 1}: missing fields {sorted(missing)}")
            pairs.append(PreferencePair(str(row.get("id", k)), row["prompt"], row["chosen"], row["rejected"]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def summarise(
    pairs: Sequence[PreferencePair],
    chosen_is_a: Sequence[bool],
    results: Sequence[PairwiseResult],
    *,
    judge: str,
    mode: str,
    order: str,
    seconds: float,
) -> EvalReport:
    correct = wrong = ties = invalid = 0
    consistent = [r.consistent for r in results if r.consistent is not None]
    p_chosen = []
    confusion = {"chosen shown as A": {}, "chosen shown as B": {}}
    for is_a, r in zip(chosen_is_a, results, strict=True):
        row = confusion["chosen shown as A" if is_a else "chosen shown as B"]
        row[r.verdict] = row.get(r.verdict, 0) + 1
        if r.verdict == "invalid":
            invalid += 1
            continue
        if r.p_a is not None:
            p_chosen.append(r.p_a if is_a else 1.0 - r.p_a)
        if r.verdict == "tie":
            ties += 1
        elif (r.verdict == "A") == is_a:
            correct += 1
        else:
            wrong += 1
    valid = correct + wrong + ties
    return EvalReport(
        judge=judge,
        mode=mode,
        order=order,
        pairs=len(pairs),
        correct=correct,
        wrong=wrong,
        ties=ties,
        invalid=invalid,
        accuracy=(correct + ties / 2) / valid if valid else None,
        strict_accuracy=correct / len(pairs) if pairs else 0.0,
        position_consistency=sum(consistent) / len(consistent) if consistent else None,
        mean_p_chosen=sum(p_chosen) / len(p_chosen) if p_chosen else None,
        seconds=seconds,
        pairs_per_second=len(pairs) / seconds if seconds else 0.0,
        confusion=confusion,
    )


async def evaluate(
    client: AsyncReferee,
    pairs: Sequence[PreferencePair],
    *,
    judge: str | None = None,
    mode: str = "logprob",
    order: str = "both",
    batch_size: int = 16,
    concurrency: int = 4,
    seed: int = 0,
    max_new_tokens: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    **options,
) -> EvalReport:
    """Judge every pair through the server, keeping ``concurrency`` requests in flight; ``options``
    are more ``PairwiseRequest`` fields (``inconsistent``, ``objective``, ``cache`` ...)."""
    rng = random.Random(seed)
    chosen_is_a = [rng.random() < 0.5 for _ in pairs]
    items = [
        PairwiseItem(prompt=p.prompt, response_a=p.chosen, response_b=p.rejected)
        if is_a
        else PairwiseItem(prompt=p.prompt, response_a=p.rejected, response_b=p.chosen)
        for p, is_a in zip(pairs, chosen_is_a, strict=True)
    ]
    batches = [items[k : k + batch_size] for k in range(0, len(items), batch_size)]
    results: list[list[PairwiseResult]] = [[] for _ in batches]
    gate = asyncio.Semaphore(concurrency)
    name = judge or ""
    usage = [0, 0]

    async def run(k: int) -> None:
        nonlocal name
        async with gate:
            req = PairwiseRequest(
                judge=judge,
                items=batches[k],
                mode=mode,
                order=order,
                seed=seed,
                max_new_tokens=max_new_tokens,
                **options,
            )
            out = await client.pairwise(req)
            usage[0] += out.usage.engine_requests
            usage[1] += out.usage.cached
            name = out.judge
            results[k] = out.results
            if on_progress:
                on_progress(len(batches[k]))

    start = time.monotonic()
    await asyncio.gather(*[run(k) for k in range(len(batches))])
    seconds = time.monotonic() - start
    flat = [r for batch in results for r in batch]
    report = summarise(pairs, chosen_is_a, flat, judge=name, mode=mode, order=order, seconds=seconds)
    report.engine_requests, report.cached = usage
    return report
