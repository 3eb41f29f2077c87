"""Reward functions for TRL's ``GRPOTrainer`` (``reward_funcs=[...]``) backed by a referee judge.

TRL calls a reward function with ``prompts``, ``completions`` and the dataset's columns as keyword
arguments and expects ``list[float | None]``, ``None`` meaning "could not score" (TRL turns it into
NaN and leaves it out). The functions here are ``async def`` so TRL overlaps their judge calls;
``sync=True`` gives a plain function for trainers that cannot await.

- ``winrate_reward``: Pref-GRPO. Completions are grouped by their prompt (not by position in the
  batch), each group is one ``/winrate`` question, and each completion's reward is its win rate.
- ``score_reward``: the judge's pointwise score (``/score``).
- ``preference_reward``: P(completion better than a reference response from a dataset column)
  (``/pairwise``).

A failed judge call gives ``None`` for the completions it concerned, never a neutral value.
Judge statistics (ties, invalid verdicts, win-rate spread, latency) are logged through TRL's
``log_metric`` keyword when TRL passes it, under ``judge/...``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from .client import AsyncReferee, RefereeError
from .protocol import Message, PairwiseItem, PairwiseRequest, ScoreItem, ScoreRequest, WinRateRequest

logger = logging.getLogger(__name__)

__all__ = ["JudgeClient", "preference_reward", "score_reward", "winrate_reward"]


class JudgeClient(Protocol):
    """What the reward functions need: ``AsyncReferee`` (HTTP) and ``QueueReferee`` (Redis) both fit."""

    async def score(self, request: ScoreRequest) -> Any: ...
    async def pairwise(self, request: PairwiseRequest) -> Any: ...
    async def winrate(self, request: WinRateRequest) -> Any: ...


ClientFactory = Callable[[], JudgeClient]
RewardFunc = Callable[..., Awaitable[list[float | None]]]


def _prompt(prompt: Any) -> str | list[Message]:
    if isinstance(prompt, str):
        return prompt
    return [Message(role=m["role"], content=_text(m["content"])) for m in prompt]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # a completion as messages, or content parts
        if content and isinstance(content[-1], dict) and "content" in content[-1]:
            return _text(content[-1]["content"])
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise TypeError(f"cannot read text from {type(content).__name__}")


def _group_by_prompt(prompts: Sequence[Any]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(json.dumps(p, sort_keys=True, default=str), []).append(i)
    return groups


class _Judged:
    """Creates the client lazily inside the event loop that calls it (TRL runs its own loop)."""

    def __init__(self, factory: ClientFactory | None, url: str | None) -> None:
        self._factory = factory or (lambda: AsyncReferee(url or "http://127.0.0.1:8000"))
        self._clients: dict[int, JudgeClient] = {}

    def client(self) -> JudgeClient:
        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            self._clients[loop] = self._factory()
        return self._clients[loop]


def _finish(func: RewardFunc, name: str, sync: bool) -> Callable[..., Any]:
    if not sync:
        func.__name__ = name
        return func

    def run(*args, **kwargs) -> list[float | None]:
        return asyncio.run(func(*args, **kwargs))

    run.__name__ = name
    return run


def _log(kwargs: dict, metrics: dict[str, float]) -> None:
    log_metric = kwargs.get("log_metric")
    if callable(log_metric):
        for key, value in metrics.items():
            log_metric(key, value)


def winrate_reward(
    *,
    url: str | None = None,
    client_factory: ClientFactory | None = None,
    judge: str | None = None,
    mode: str = "logprob",
    order: str = "both",
    opponents: int | None = None,
    soft: bool = False,
    rubric: str | None = None,
    name: str = "winrate",
    sync: bool = False,
) -> Callable[..., Any]:
    """Pref-GRPO's reward: each completion's win rate within the group of its prompt's completions."""
    judged = _Judged(client_factory, url)

    async def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float | None]:
        client = judged.client()
        rewards: list[float | None] = [None] * len(completions)
        groups = [g for g in _group_by_prompt(prompts).values()]
        start = time.monotonic()

        async def one(indices: list[int]) -> Any:
            if len(indices) < 2:
                return None  # nothing to compare with: no signal, so no reward
            request = WinRateRequest(
                judge=judge,
                prompt=_prompt(prompts[indices[0]]),
                responses=[_text(completions[i]) for i in indices],
                mode=mode,
                order=order,
                opponents=opponents,
                soft=soft,
                rubric=rubric,
            )
            return await client.winrate(request)

        answers = await asyncio.gather(*[one(g) for g in groups], return_exceptions=True)
        ties = invalid = failed = 0
        spreads = []
        for indices, answer in zip(groups, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, RefereeError):
                    raise answer
                failed += 1
                logger.warning("win-rate judging failed for a group of %d: %s", len(indices), answer)
                continue
            if answer is None:
                continue
            for i, rate in zip(indices, answer.win_rates, strict=True):
                rewards[i] = rate
            ties += answer.ties
            invalid += answer.invalid
            defined = [r for r in answer.win_rates if r is not None]
            if len(defined) > 1:
                spreads.append(statistics.pstdev(defined))
        _log(
            kwargs,
            {
                "judge/latency_s": time.monotonic() - start,
                "judge/ties": float(ties),
                "judge/invalid": float(invalid),
                "judge/failed_groups": float(failed),
                "judge/winrate_spread": statistics.fmean(spreads) if spreads else math.nan,
            },
        )
        return rewards

    return _finish(reward, name, sync)


def score_reward(
    *,
    url: str | None = None,
    client_factory: ClientFactory | None = None,
    judge: str | None = None,
    rubric: str | None = None,
    name: str = "score",
    sync: bool = False,
) -> Callable[..., Any]:
    """The judge's pointwise score of each completion (a reward model's logit, or a judge's rating)."""
    judged = _Judged(client_factory, url)

    async def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float | None]:
        start = time.monotonic()
        items = [
            ScoreItem(prompt=_prompt(p), response=_text(c)) for p, c in zip(prompts, completions, strict=True)
        ]
        try:
            out = await judged.client().score(ScoreRequest(judge=judge, items=items, rubric=rubric))
        except RefereeError as exc:
            logger.warning("scoring failed for %d completions: %s", len(items), exc)
            return [None] * len(items)
        _log(
            kwargs,
            {
                "judge/latency_s": time.monotonic() - start,
                "judge/failed_items": float(sum(r.score is None for r in out.results)),
            },
        )
        return [r.score for r in out.results]

    return _finish(reward, name, sync)


def preference_reward(
    *,
    url: str | None = None,
    client_factory: ClientFactory | None = None,
    reference_column: str = "reference",
    judge: str | None = None,
    mode: str = "logprob",
    order: str = "both",
    rubric: str | None = None,
    name: str = "preference",
    sync: bool = False,
) -> Callable[..., Any]:
    """P(completion is better than the dataset's reference response), from ``/pairwise``."""
    judged = _Judged(client_factory, url)

    async def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float | None]:
        if reference_column not in kwargs:
            raise KeyError(
                f"preference_reward needs a dataset column {reference_column!r} with reference responses"
            )
        references = kwargs[reference_column]
        start = time.monotonic()
        items = [
            PairwiseItem(prompt=_prompt(p), response_a=_text(c), response_b=_text(r))
            for p, c, r in zip(prompts, completions, references, strict=True)
        ]
        try:
            out = await judged.client().pairwise(
                PairwiseRequest(judge=judge, items=items, mode=mode, order=order, rubric=rubric)
            )
        except RefereeError as exc:
            logger.warning("preference judging failed for %d completions: %s", len(items), exc)
            return [None] * len(items)
        _log(
            kwargs,
            {
                "judge/latency_s": time.monotonic() - start,
                "judge/ties": float(sum(r.verdict == "tie" for r in out.results)),
                "judge/invalid": float(sum(r.verdict == "invalid" for r in out.results)),
            },
        )
        return [r.p_a for r in out.results]

    return _finish(reward, name, sync)
