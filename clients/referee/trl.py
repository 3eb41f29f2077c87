"""Reward functions for TRL's ``GRPOTrainer`` (``reward_funcs=[...]``) backed by a referee judge.

TRL calls a reward function with ``prompts``, ``completions`` and the dataset's columns as keyword
arguments and expects ``list[float | None]``. The functions here are ``async def`` so TRL overlaps
their judge calls; ``sync=True`` gives a plain function for trainers that cannot await.

What TRL (1.16, ``GRPOTrainer._generate_and_score_completions``) does with ``None``: it becomes NaN
in ``rewards_per_func``. A completion is left out (reward NaN, out of its group's mean and std,
advantage 0) only when *every* reward function returned ``None`` for it. Otherwise:

- ``multi_objective_aggregation="sum_then_normalize"`` (the default): the reward is the weighted
  ``nansum`` over the functions, so a ``None`` counts as 0 -- for a win rate the worst reward in
  the group, whatever the other functions say (even one at weight 0: 0 * x is still a number).
- ``"normalize_then_sum"``: each function is z-scored in its group with ``nanmean``/``nanstd``
  and then ``nansum``-ed, so a ``None`` counts as that function's group mean.

Hence ``on_failure``, one per reward function, says what a completion the judge could not score
gets:

- ``"group_mean"`` (the default): the mean of this function's rewards over the completions of the
  same prompt that were scored; a group with none scored stays ``None``. It adds no signal in
  either aggregation and with one reward function or several: its advantage from this function is
  0, as if left out. A wholly unscored group stays ``None``: with one function TRL leaves the group
  out, with several it adds the same 0 to every member of the group, which the group baseline
  removes. The safe default.
- ``"mask"``: ``None``, TRL's own leave-out. Exact with one reward function (or when every
  function masks the same completions); with several, TRL counts it as described above, so this
  logs a warning.
- ``"raise"``: ``RewardUnavailable``, stopping the training step.
- a float: that value, for a user who has chosen what an unjudged completion is worth.

Never silently the worst score. Counts go to TRL's ``log_metric`` under ``judge/<name>/unscored``
(completions the judge could not score), ``judge/<name>/filled`` (given a value by the policy)
and ``judge/<name>/masked`` (returned as ``None``).

- ``winrate_reward``: Pref-GRPO. Completions are grouped by their prompt (not by position in the
  batch), each group is one ``/winrate`` question, and each completion's reward is its win rate.
- ``score_reward``: the judge's pointwise score (``/score``).
- ``preference_reward``: P(completion better than a reference response from a dataset column)
  (``/pairwise``).

A failed judge call leaves the completions it concerned unscored, and ``on_failure`` decides.
Judge statistics (ties, invalid verdicts, win-rate spread, latency) are logged through TRL's
``log_metric`` keyword when TRL passes it, under ``judge/...``.

A server with tenants needs a key: ``api_key=`` (default ``$REFEREE_API_KEY``; prefer the
environment to a key in a training script) and optionally ``job_id=`` (the server shares the
tenant's capacity fairly between its jobs). Through Redis, give the key to the client instead:
``client_factory=lambda: QueueReferee(job_id="run-1", api_key=key)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

from .client import AsyncReferee, RefereeError
from .protocol import Message, PairwiseItem, PairwiseRequest, ScoreItem, ScoreRequest, WinRateRequest

logger = logging.getLogger(__name__)

__all__ = [
    "JudgeClient",
    "OnFailure",
    "RewardUnavailable",
    "preference_reward",
    "score_reward",
    "winrate_reward",
]

OnFailure = Literal["mask", "raise", "group_mean"] | float


class RewardUnavailable(RuntimeError):
    """``on_failure="raise"``: the judge could not score some completions."""


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

    def __init__(
        self,
        factory: ClientFactory | None,
        url: str | None,
        api_key: str | None = None,
        job_id: str | None = None,
    ) -> None:
        if factory is not None and (api_key is not None or job_id is not None):
            raise ValueError(
                "give api_key/job_id to the client your client_factory makes "
                "(AsyncReferee(..., api_key=...) or QueueReferee(..., api_key=...)), not to the reward"
            )
        self._factory = factory or (
            lambda: AsyncReferee(url or "http://127.0.0.1:8000", api_key=api_key, job_id=job_id)
        )
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


def _check_policy(on_failure: OnFailure) -> OnFailure:
    if isinstance(on_failure, bool) or not (
        on_failure in ("mask", "raise", "group_mean")
        or (isinstance(on_failure, int | float) and math.isfinite(on_failure))
    ):
        raise ValueError(
            f"on_failure must be 'mask', 'raise', 'group_mean' or a finite number, got {on_failure!r}"
        )
    return on_failure


def apply_on_failure(
    rewards: Sequence[float | None],
    prompts: Sequence[Any],
    on_failure: OnFailure,
    name: str,
    kwargs: dict | None = None,
) -> list[float | None]:
    """Give the completions without a reward (``None`` or NaN) what ``on_failure`` says; log counts."""
    out = [None if r is None or (isinstance(r, float) and math.isnan(r)) else r for r in rewards]
    missing = [i for i, r in enumerate(out) if r is None]
    if missing and on_failure == "raise":
        raise RewardUnavailable(
            f"reward {name!r}: the judge could not score {len(missing)} of {len(out)} completions "
            "(on_failure='raise')"
        )
    if missing and on_failure == "group_mean":
        for indices in _group_by_prompt(prompts).values():
            scored = [out[i] for i in indices if out[i] is not None]
            if scored:
                mean = statistics.fmean(scored)
                for i in indices:
                    if out[i] is None:
                        out[i] = mean
    elif missing and on_failure != "mask":
        for i in missing:
            out[i] = float(on_failure)
    masked = sum(r is None for r in out)
    if masked and on_failure == "mask":
        logger.warning(
            "reward %r: %d completions unscored, returned as None; TRL leaves one out only when every "
            "reward function returned None for it, and otherwise counts it as 0 (sum_then_normalize)",
            name,
            masked,
        )
    _log(
        kwargs or {},
        {
            f"judge/{name}/unscored": float(len(missing)),
            f"judge/{name}/filled": float(len(missing) - masked),
            f"judge/{name}/masked": float(masked),
        },
    )
    return out


def _log(kwargs: dict, metrics: dict[str, float]) -> None:
    log_metric = kwargs.get("log_metric")
    if callable(log_metric):
        for key, value in metrics.items():
            log_metric(key, value)


def winrate_reward(
    *,
    url: str | None = None,
    client_factory: ClientFactory | None = None,
    api_key: str | None = None,
    job_id: str | None = None,
    judge: str | None = None,
    mode: str = "logprob",
    order: str = "both",
    opponents: int | None = None,
    soft: bool = False,
    rubric: str | None = None,
    inconsistent: str | None = None,
    on_failure: OnFailure = "group_mean",
    name: str = "winrate",
    sync: bool = False,
) -> Callable[..., Any]:
    """Pref-GRPO's reward: each completion's win rate within the group of its prompt's completions."""
    judged = _Judged(client_factory, url, api_key, job_id)
    on_failure = _check_policy(on_failure)

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
                inconsistent=inconsistent,
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
        return apply_on_failure(rewards, prompts, on_failure, name, kwargs)

    return _finish(reward, name, sync)


def score_reward(
    *,
    url: str | None = None,
    client_factory: ClientFactory | None = None,
    api_key: str | None = None,
    job_id: str | None = None,
    judge: str | None = None,
    rubric: str | None = None,
    on_failure: OnFailure = "group_mean",
    name: str = "score",
    sync: bool = False,
) -> Callable[..., Any]:
    """The judge's pointwise score of each completion (a reward model's logit, or a judge's rating)."""
    judged = _Judged(client_factory, url, api_key, job_id)
    on_failure = _check_policy(on_failure)

    async def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float | None]:
        start = time.monotonic()
        items = [
            ScoreItem(prompt=_prompt(p), response=_text(c)) for p, c in zip(prompts, completions, strict=True)
        ]
        try:
            out = await judged.client().score(ScoreRequest(judge=judge, items=items, rubric=rubric))
        except RefereeError as exc:
            logger.warning("scoring failed for %d completions: %s", len(items), exc)
            return apply_on_failure([None] * len(items), prompts, on_failure, name, kwargs)
        _log(
            kwargs,
            {
                "judge/latency_s": time.monotonic() - start,
                "judge/failed_items": float(sum(r.score is None for r in out.results)),
            },
        )
        return apply_on_failure([r.score for r in out.results], prompts, on_failure, name, kwargs)

    return _finish(reward, name, sync)


def preference_reward(
    *,
    url: str | None = None,
    client_factory: ClientFactory | None = None,
    api_key: str | None = None,
    job_id: str | None = None,
    reference_column: str = "reference",
    judge: str | None = None,
    mode: str = "logprob",
    order: str = "both",
    rubric: str | None = None,
    inconsistent: str | None = None,
    on_failure: OnFailure = "group_mean",
    name: str = "preference",
    sync: bool = False,
) -> Callable[..., Any]:
    """P(completion is better than the dataset's reference response), from ``/pairwise``."""
    judged = _Judged(client_factory, url, api_key, job_id)
    on_failure = _check_policy(on_failure)

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
                PairwiseRequest(
                    judge=judge,
                    items=items,
                    mode=mode,
                    order=order,
                    rubric=rubric,
                    inconsistent=inconsistent,
                )
            )
        except RefereeError as exc:
            logger.warning("preference judging failed for %d completions: %s", len(items), exc)
            return apply_on_failure([None] * len(items), prompts, on_failure, name, kwargs)
        _log(
            kwargs,
            {
                "judge/latency_s": time.monotonic() - start,
                "judge/ties": float(sum(r.verdict == "tie" for r in out.results)),
                "judge/invalid": float(sum(r.verdict == "invalid" for r in out.results)),
            },
        )
        return apply_on_failure([r.p_a for r in out.results], prompts, on_failure, name, kwargs)

    return _finish(reward, name, sync)
