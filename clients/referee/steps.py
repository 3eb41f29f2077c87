"""Step rewards from a process reward model (a judge of kind ``prm``), typed for trainers.

``Referee.step_rewards`` / ``AsyncReferee.step_rewards`` / ``QueueReferee.step_rewards`` score one
response (text, split on the judge's ``step_delimiter``, or a list of steps taken as given) and
return a ``StepReward``: each step's score, each step's ``[start, end)`` character span and the
aggregate (the judge's, ``min`` unless configured, or the ``aggregate`` asked for).

Dense rewards (``token_rewards``): a trainer's reward tensor has one value per response token. Each
step's score goes on the **last token of that step** -- the last token whose character span overlaps
the step's span -- and every other token gets 0, the convention of outcome rewards placed on a
response's last token, applied per step. Tokens are given by their character offsets in the
response text (a fast tokenizer's ``return_offsets_mapping``, or the tokenizer itself). Where two
steps end in the same token (a token that spans a step's end and the next step's start, when steps
were joined without a delimiter) that token holds the sum of their scores, so that the sum of the
dense rewards is always the sum of the step scores. A step no token overlaps (the response was
truncated before it) is a ``ValueError`` naming it, never a reward silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .protocol import STEP_DELIMITER, Prompt, ScoreItem, ScoreRequest, ScoreResponse, ScoreResult, Steps

__all__ = [
    "StepReward",
    "dense_rewards",
    "place_on_tokens",
    "response_text",
    "step_request",
    "token_offsets",
]


@dataclass(frozen=True)
class StepReward:
    """A process reward model's judgment of one response."""

    step_scores: list[float]
    step_spans: list[tuple[int, int]]  # [start, end) of each step in the response text
    aggregate: float  # the one reward from the step scores (the judge's or the requested aggregate)

    @classmethod
    def from_result(cls, result: ScoreResult, judge: str | None = None) -> StepReward:
        """A ``/score`` result as a ``StepReward``; ``StepRewardError`` where it has no step scores."""
        from .client import StepRewardError

        if result.error is not None:
            raise StepRewardError(f"the judge could not score the steps: {result.error}")
        if result.step_scores is None or result.step_spans is None or result.score is None:
            raise StepRewardError(
                f"judge {judge or '(default)'!r} gave no step scores: step rewards need a process reward "
                "model (a judge of kind prm)"
            )
        return cls(
            step_scores=list(result.step_scores),
            step_spans=[(int(a), int(b)) for a, b in result.step_spans],
            aggregate=float(result.score),
        )

    def dense(self, offsets: Sequence[Sequence[int]]) -> list[float]:
        """The step scores placed on tokens with these character offsets (``place_on_tokens``)."""
        return place_on_tokens(self.step_scores, self.step_spans, offsets)


def _steps(response: str | Sequence[str] | Steps) -> str | Steps:
    if isinstance(response, str | Steps):
        return response
    if isinstance(response, Sequence) and all(isinstance(s, str) for s in response):
        return Steps(steps=list(response))
    raise TypeError(f"a response is text or a list of steps (strings), not {type(response).__name__}")


def step_request(
    prompt: Prompt, response: str | Sequence[str] | Steps, *, judge: str | None, aggregate: str | None
) -> ScoreRequest:
    """The ``/score`` request of one response's step rewards (a list becomes ``{"steps": [...]}``)."""
    fields: dict[str, Any] = {"items": [ScoreItem(prompt=prompt, response=_steps(response))]}
    if judge is not None:
        fields["judge"] = judge
    if aggregate is not None:
        fields["aggregate"] = aggregate
    return ScoreRequest(**fields)


def step_reward(answer: ScoreResponse) -> StepReward:
    return StepReward.from_result(answer.results[0], answer.judge)


def response_text(response: str | Sequence[str] | Steps, delimiter: str = STEP_DELIMITER) -> str:
    """The text ``step_spans`` index: the response, or a list of steps joined with ``delimiter`` (the
    judge's ``step_delimiter``; blank lines unless it was configured otherwise)."""
    response = _steps(response)
    return response if isinstance(response, str) else response.text(delimiter)


def token_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Each token's ``[start, end)`` in ``text`` as a fast Hugging Face tokenizer cuts it (no special
    tokens added): the offsets ``place_on_tokens`` takes."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def place_on_tokens(
    step_scores: Sequence[float], step_spans: Sequence[Sequence[int]], offsets: Sequence[Sequence[int]]
) -> list[float]:
    """Dense rewards: one value per token (``offsets``: each token's ``[start, end)`` in the response
    text), each step's score on the last token overlapping the step, 0 elsewhere. Tokens without
    characters (``(0, 0)``, special tokens) never hold a reward."""
    if len(step_scores) != len(step_spans):
        raise ValueError(f"{len(step_scores)} step scores for {len(step_spans)} step spans")
    rewards = [0.0] * len(offsets)
    for k, (score, (start, end)) in enumerate(zip(step_scores, step_spans, strict=True)):
        last = None
        for t, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:
                last = t
        if last is None:
            raise ValueError(
                f"step {k} (characters {start}..{end}) overlaps no token: the offsets do not cover it "
                "(a truncated response, or offsets of another text)"
            )
        rewards[last] += score
    return rewards


def check_tokens(offsets: Any, tokenizer: Any) -> None:
    if (offsets is None) == (tokenizer is None):
        raise ValueError("give the response tokens' offsets or a tokenizer (one of them)")


def dense_rewards(
    reward: StepReward,
    response: str | Sequence[str] | Steps,
    *,
    offsets: Sequence[Sequence[int]] | None = None,
    tokenizer: Any = None,
    delimiter: str = STEP_DELIMITER,
) -> list[float]:
    """``reward``'s step scores on the tokens of ``response_text(response, delimiter)``: tokens given
    by their ``offsets`` in that text, or cut by ``tokenizer``. For a list of steps the spans are
    those of the steps in that text (joined with ``delimiter``, whatever the judge's delimiter), so
    the trainer's text and the rewards' places always agree."""
    check_tokens(offsets, tokenizer)
    steps = _steps(response)
    text = response_text(steps, delimiter)
    spans = reward.step_spans
    if isinstance(steps, Steps):
        if len(steps.steps) != len(reward.step_scores):
            raise ValueError(f"{len(reward.step_scores)} step scores for {len(steps.steps)} steps")
        spans, start = [], 0
        for step in steps.steps:
            spans.append((start, start + len(step)))
            start += len(step) + len(delimiter)
    if offsets is None:
        offsets = token_offsets(tokenizer, text)
    return place_on_tokens(reward.step_scores, spans, offsets)
