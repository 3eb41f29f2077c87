"""Reward functions for TRL's ``GRPOTrainer`` (``reward_funcs=[...]``) backed by a referee judge.

TRL calls a reward function with ``prompts``, ``completions`` and the dataset's columns as keyword
arguments and expects ``list[float | None]``. The rewards here are objects with an ``async``
``__call__`` so that TRL overlaps their judge calls; ``sync=True`` gives a plain callable for
trainers that cannot await.

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

- ``winrate_reward`` (``WinRateReward``): Pref-GRPO. Completions are grouped by their prompt (not
  by position in the batch; ``referee.rewards.group_by_prompt``), each group is one ``/winrate``
  question, and each completion's reward is its win rate. The only completion of its prompt has
  none (nothing to compare it with) and is unscored.
- ``score_reward`` (``ScoreReward``): the judge's pointwise score (``/score``). With a process
  reward model (a judge of kind ``prm``) that is the aggregate of the completion's step scores
  (steps split on the judge's ``step_delimiter``): ``aggregate=`` ("min", "last", "mean",
  "product") asks for one other than the judge's. TRL takes one number per completion; for dense
  per-token rewards use ``Referee.token_rewards``.
- ``preference_reward`` (``PreferenceReward``): P(completion better than a reference response from
  a dataset column) (``/pairwise``).

A failed judge call leaves the completions it concerned unscored, and ``on_failure`` decides.
Judge statistics (ties, invalid verdicts, win-rate spread, latency) are logged through TRL's
``log_metric`` keyword when TRL passes it, under ``judge/...``.

The rewards pickle, which TRL's ``AsyncGRPOTrainer`` needs (it scores in a spawned process and
refuses closures): a live client is never pickled, and each process, each event loop, makes its
own client on its first call and reuses it. A ``client_factory`` must then pickle too:
``functools.partial(QueueReferee, job_id="run-1")``, not a lambda. Each reward has a ``__name__``
(``name=``), which TRL logs it under. ``await reward.aclose()`` closes the calling loop's client.

``sync=True`` wraps a reward in ``SyncReward``: a plain callable that runs the reward on an event
loop of its own, in a thread, so that every call reuses one client; ``close()`` (or a ``with``
block; otherwise garbage collection or the end of the process) closes it.

A server with tenants needs a key: ``api_key=`` (default ``$REFEREE_API_KEY``; prefer the
environment to a key in a training script) and optionally ``job_id=`` (the server shares the
tenant's capacity fairly between its jobs). Through Redis, the client takes the key:
``client_factory=functools.partial(QueueReferee, job_id="run-1")`` reads ``$REFEREE_API_KEY``
(an ``api_key=`` given to the partial would show in its ``repr``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from .client import AsyncReferee, RefereeError
from .defaults import DEFAULT_URL
from .protocol import Message, PairwiseItem, PairwiseRequest, ScoreItem, ScoreRequest, WinRateRequest
from .rewards import group_by_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "JudgeClient",
    "OnFailure",
    "PreferenceReward",
    "RefereeReward",
    "RewardUnavailable",
    "ScoreReward",
    "SyncReward",
    "WinRateReward",
    "apply_on_failure",
    "preference_reward",
    "score_reward",
    "winrate_reward",
]

OnFailure = Literal["mask", "raise", "group_mean"] | float
T = TypeVar("T")


class RewardUnavailable(RuntimeError):
    """``on_failure="raise"``: the judge could not score some completions."""


class JudgeClient(Protocol):
    """What the reward functions need: ``AsyncReferee`` (HTTP) and ``QueueReferee`` (Redis) both fit."""

    async def score(self, request: ScoreRequest) -> Any: ...
    async def pairwise(self, request: PairwiseRequest) -> Any: ...
    async def winrate(self, request: WinRateRequest) -> Any: ...


ClientFactory = Callable[[], JudgeClient]


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
        for indices in group_by_prompt(prompts):
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


# ---------------------------------------------------------------- the rewards


@dataclass(kw_only=True, repr=False, eq=False)
class RefereeReward:
    """What the rewards share: where the judge is, ``on_failure``, a name, and one client per loop.

    A client belongs to the event loop it was made in (its connections do), so each loop that
    calls the reward gets its own, made on its first call and kept for the next ones; a client
    whose loop has closed is dropped. Pickling keeps the settings and drops the clients.
    """

    url: str | None = None
    client_factory: ClientFactory | None = None
    api_key: str | None = None
    job_id: str | None = None
    judge: str | None = None
    rubric: str | None = None
    on_failure: OnFailure = "group_mean"
    name: str = "reward"

    def __post_init__(self) -> None:
        if self.client_factory is not None and (self.api_key is not None or self.job_id is not None):
            raise ValueError(
                "give api_key/job_id to the client your client_factory makes "
                "(AsyncReferee(..., api_key=...) or QueueReferee(..., api_key=...)), not to the reward"
            )
        self.on_failure = _check_policy(self.on_failure)
        self.__name__ = self.name  # what TRL logs the reward under
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, JudgeClient]] = {}

    def __repr__(self) -> str:  # never the key, nor a URL that may carry one
        return f"{type(self).__name__}(name={self.name!r}, judge={self.judge!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_clients": {}}

    def client(self) -> JudgeClient:
        """The calling event loop's client, made on its first call."""
        loop = asyncio.get_running_loop()
        for key, (owner, _) in list(self._clients.items()):
            if owner.is_closed():  # gone with its loop: nothing left to close it with
                self._clients.pop(key, None)
        entry = self._clients.get(id(loop))
        if entry is None:
            entry = self._clients[id(loop)] = (loop, self._new_client())
        return entry[1]

    def _new_client(self) -> JudgeClient:
        if self.client_factory is not None:
            return self.client_factory()
        return AsyncReferee(self.url or DEFAULT_URL, api_key=self.api_key, job_id=self.job_id)

    async def aclose(self) -> None:
        """Close the calling event loop's client; a later call makes a new one."""
        entry = self._clients.pop(id(asyncio.get_running_loop()), None)
        close = getattr(entry[1], "aclose", None) if entry is not None else None
        if close is not None:
            await close()

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs
    ) -> list[float | None]:
        raise NotImplementedError


@dataclass(kw_only=True, repr=False, eq=False)
class WinRateReward(RefereeReward):
    """Pref-GRPO's reward: each completion's win rate within the group of its prompt's completions."""

    mode: str = "logprob"
    order: str = "both"
    opponents: int | None = None
    soft: bool = False
    inconsistent: str | None = None
    schedule: str | None = None  # "listwise": the judge ranks each group in one generation
    estimate: str | None = None  # "bradley_terry" for sparse schedules (opponents=k)
    objective: str | None = None  # multi-objective reward models: one objective
    weights: dict[str, float] | None = None  # ... or these weights of the objectives
    name: str = "winrate"

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs
    ) -> list[float | None]:
        client = self.client()
        rewards: list[float | None] = [None] * len(completions)
        groups = group_by_prompt(prompts)
        start = time.monotonic()

        async def one(indices: list[int]) -> Any:
            if len(indices) < 2:
                return None  # nothing to compare with: no signal, so no reward
            request = WinRateRequest(
                judge=self.judge,
                prompt=_prompt(prompts[indices[0]]),
                responses=[_text(completions[i]) for i in indices],
                mode=self.mode,
                order=self.order,
                opponents=self.opponents,
                soft=self.soft,
                rubric=self.rubric,
                inconsistent=self.inconsistent,
                **_given(
                    schedule=self.schedule,
                    estimate=self.estimate,
                    objective=self.objective,
                    weights=self.weights,
                ),
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
        return apply_on_failure(rewards, prompts, self.on_failure, self.name, kwargs)


@dataclass(kw_only=True, repr=False, eq=False)
class ScoreReward(RefereeReward):
    """The judge's pointwise score of each completion (a reward model's logit, or a judge's rating).

    With ``transform`` ("par" or "log_sigmoid", see docs/rewards.md) each score is shaped against
    its row's reference: a reference response in the dataset column ``reference_column``, or a
    reference reward in ``reference_score_column``. A process reward model's score is the aggregate
    of the completion's step scores (``aggregate``: min, last, mean or product; default the judge's)."""

    objective: str | None = None
    weights: dict[str, float] | None = None
    transform: str | None = None
    reference_column: str | None = None
    reference_score_column: str | None = None
    aggregate: str | None = None  # process reward models: min, last, mean or product of the steps
    name: str = "score"

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs
    ) -> list[float | None]:
        start = time.monotonic()
        references: list[dict] = [{} for _ in completions]
        for column, field in (
            (self.reference_column, "reference"),
            (self.reference_score_column, "reference_score"),
        ):
            if column is None:
                continue
            if column not in kwargs:
                raise KeyError(f"score_reward needs a dataset column {column!r} ({field} of each row)")
            for ref, value in zip(references, kwargs[column], strict=True):
                ref[field] = _text(value) if field == "reference" else float(value)
        items = [
            ScoreItem(prompt=_prompt(p), response=_text(c), **ref)
            for p, c, ref in zip(prompts, completions, references, strict=True)
        ]
        options = _given(
            objective=self.objective, weights=self.weights, transform=self.transform, aggregate=self.aggregate
        )
        try:
            out = await self.client().score(
                ScoreRequest(judge=self.judge, items=items, rubric=self.rubric, **options)
            )
        except RefereeError as exc:
            logger.warning("scoring failed for %d completions: %s", len(items), exc)
            return apply_on_failure([None] * len(items), prompts, self.on_failure, self.name, kwargs)
        _log(
            kwargs,
            {
                "judge/latency_s": time.monotonic() - start,
                "judge/failed_items": float(sum(r.score is None for r in out.results)),
            },
        )
        return apply_on_failure([r.score for r in out.results], prompts, self.on_failure, self.name, kwargs)


@dataclass(kw_only=True, repr=False, eq=False)
class PreferenceReward(RefereeReward):
    """P(completion is better than the dataset's reference response), from ``/pairwise``."""

    reference_column: str = "reference"
    mode: str = "logprob"
    order: str = "both"
    inconsistent: str | None = None
    name: str = "preference"

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs
    ) -> list[float | None]:
        if self.reference_column not in kwargs:
            raise KeyError(
                f"preference_reward needs a dataset column {self.reference_column!r} with reference responses"
            )
        references = kwargs[self.reference_column]
        start = time.monotonic()
        items = [
            PairwiseItem(prompt=_prompt(p), response_a=_text(c), response_b=_text(r))
            for p, c, r in zip(prompts, completions, references, strict=True)
        ]
        request = PairwiseRequest(
            judge=self.judge,
            items=items,
            mode=self.mode,
            order=self.order,
            rubric=self.rubric,
            inconsistent=self.inconsistent,
        )
        try:
            out = await self.client().pairwise(request)
        except RefereeError as exc:
            logger.warning("preference judging failed for %d completions: %s", len(items), exc)
            return apply_on_failure([None] * len(items), prompts, self.on_failure, self.name, kwargs)
        _log(
            kwargs,
            {
                "judge/latency_s": time.monotonic() - start,
                "judge/ties": float(sum(r.verdict == "tie" for r in out.results)),
                "judge/invalid": float(sum(r.verdict == "invalid" for r in out.results)),
            },
        )
        return apply_on_failure([r.p_a for r in out.results], prompts, self.on_failure, self.name, kwargs)


def _given(**options) -> dict[str, Any]:
    """The options a reward was given (unset ones are not sent: older servers do not know them)."""
    return {k: v for k, v in options.items() if v is not None}


# ---------------------------------------------------------------- the plain-function form


class _LoopThread:
    """An event loop running in a daemon thread, for callers that block."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, reward: RefereeReward, timeout: float = 30.0) -> None:
        """Close the reward's client in this loop, then stop the loop and its thread."""

        async def finish() -> None:
            try:
                await reward.aclose()
            finally:
                await self.loop.shutdown_asyncgens()
                await self.loop.shutdown_default_executor()

        try:
            if self.thread.is_alive():
                self.run(finish(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
            if not self.thread.is_alive() and not self.loop.is_running():  # (a forked copy still "runs")
                self.loop.close()


class SyncReward:
    """A reward as a plain function, for trainers that cannot await (``sync=True``).

    The reward runs on an event loop of its own, in a daemon thread started by the first call, so
    every call reuses one client (its connections included); calls from several threads at once
    share it. ``close()``, or leaving a ``with`` block, closes the client and stops the thread (a
    later call starts them again); a reward never closed is closed when it is garbage collected or
    the process exits. It pickles as the reward it wraps; the copy starts its own loop.
    """

    def __init__(self, reward: RefereeReward) -> None:
        self.reward = reward
        self.__name__ = reward.__name__
        self._lock = threading.Lock()
        self._runner: _LoopThread | None = None
        self._finalizer: weakref.finalize | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        runner = self._started()
        return runner.run(self.reward(*args, **kwargs))

    def _started(self) -> _LoopThread:
        with self._lock:
            if self._runner is not None and not self._runner.thread.is_alive():  # a forked child
                self._finalizer()
                self._runner = None
            if self._runner is None:
                self._runner = _LoopThread(f"referee-reward-{self.__name__}")
                # Holds the loop and the reward, never self: it runs when self is collected, or at exit.
                self._finalizer = weakref.finalize(self, self._runner.stop, self.reward)
            return self._runner

    def close(self) -> None:
        """Close the client and stop the loop's thread."""
        with self._lock:
            finalizer, self._finalizer, self._runner = self._finalizer, None, None
        if finalizer is not None:
            finalizer()

    def __enter__(self) -> SyncReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[type[SyncReward], tuple[RefereeReward]]:
        return (SyncReward, (self.reward,))

    def __repr__(self) -> str:
        return f"SyncReward({self.reward!r})"


def _make(cls: type[RefereeReward], arguments: dict[str, Any]) -> RefereeReward | SyncReward:
    """A factory's reward, from the factory's own arguments (its ``locals()``)."""
    sync = arguments.pop("sync")
    reward = cls(**arguments)
    return SyncReward(reward) if sync else reward


# ---------------------------------------------------------------- the factories


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
    schedule: str | None = None,
    estimate: str | None = None,
    objective: str | None = None,
    weights: dict[str, float] | None = None,
    on_failure: OnFailure = "group_mean",
    name: str = "winrate",
    sync: bool = False,
) -> WinRateReward | SyncReward:
    """Pref-GRPO's reward (``WinRateReward``): each completion's win rate within its prompt's group."""
    return _make(WinRateReward, locals())


def score_reward(
    *,
    url: str | None = None,
    client_factory: ClientFactory | None = None,
    api_key: str | None = None,
    job_id: str | None = None,
    judge: str | None = None,
    rubric: str | None = None,
    objective: str | None = None,
    weights: dict[str, float] | None = None,
    transform: str | None = None,
    reference_column: str | None = None,
    reference_score_column: str | None = None,
    aggregate: str | None = None,
    on_failure: OnFailure = "group_mean",
    name: str = "score",
    sync: bool = False,
) -> ScoreReward | SyncReward:
    """The judge's pointwise score of each completion (``ScoreReward``); a process reward model's:
    the aggregate of the steps' scores (``aggregate``, default the judge's)."""
    return _make(ScoreReward, locals())


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
) -> PreferenceReward | SyncReward:
    """P(completion is better than the dataset's reference response) (``PreferenceReward``)."""
    return _make(PreferenceReward, locals())
