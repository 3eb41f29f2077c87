"""Follow-up likelihood as a pointwise reward (``kind: followup``)."""

from __future__ import annotations

import asyncio
from typing import ClassVar, Literal

from pydantic import Field

from referee.protocol import Prompt, image_parts

from ..engine_types import NOT_PER_ITEM
from ..judge_settings import EngineJudgeSettings
from .base import Judge, JudgeConfigError, Rating, RequestContext, _describe

# Follow-up utterances of a satisfied and of a dissatisfied user (follow-up likelihood as reward,
# Zhang et al. 2024): short, generic, and about the answer rather than its topic.
FOLLOWUPS_POSITIVE = (
    "Thank you, that answers my question.",
    "Great, that is really helpful.",
)
FOLLOWUPS_NEGATIVE = (
    "That is not what I asked.",
    "That is wrong and not helpful.",
)


class FollowupSettings(EngineJudgeSettings):
    kind: Literal["followup"] = "followup"
    followups_positive: list[str] = Field(
        default_factory=lambda: list(FOLLOWUPS_POSITIVE),
        description="Next messages of a user whose question was answered well.",
    )
    followups_negative: list[str] = Field(
        default_factory=lambda: list(FOLLOWUPS_NEGATIVE),
        description="Next messages of a user whose question was not answered well.",
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FollowupJudge(Judge):
    """Follow-up likelihood as reward (Zhang et al. 2024, "Aligning Language Models Using Follow-up
    Likelihood as Reward Signal", arXiv:2409.13948): after the conversation and the response, how
    likely the judge model finds a satisfied next message from the user against a dissatisfied one.
    The reward is the mean per-token log-probability of the positive follow-ups minus that of the
    negative ones, read from vLLM's prompt log-probabilities (one prefill per follow-up, no
    generation). Pointwise: a group of N costs N x (follow-ups) engine requests, and it runs on any
    instruction-tuned model, sharing the engine of a generative judge on the same model."""

    settings: FollowupSettings
    runner: ClassVar[str | None] = "generate"

    def __post_init__(self) -> None:
        if not self.engine.tokenizer.chat_template:
            raise JudgeConfigError(
                f"judge {self.name!r}: the model {self.settings.model} has no chat template; a followup "
                "judge must be an instruction-tuned chat model"
            )
        if not self.settings.followups_positive or not self.settings.followups_negative:
            raise JudgeConfigError(
                f"judge {self.name!r}: give at least one positive and one negative follow-up"
            )

    @property
    def media(self) -> list[str]:
        return []  # the follow-ups are scored on text; images are not passed to the engine

    def rating_cost(self) -> int:
        return len(self.settings.followups_positive) + len(self.settings.followups_negative)

    def _span(self, messages: list[dict], followup: str) -> tuple[list[int], int]:
        """The conversation with the follow-up as the user's next message, cut after the follow-up's
        own tokens, and where they start (the template's turn markers around it are not scored)."""
        full = self.engine.chat_ids(
            [*messages, {"role": "user", "content": followup}], generation_prompt=False
        )
        empty = self.engine.chat_ids([*messages, {"role": "user", "content": ""}], generation_prompt=False)
        start = _common_prefix(full, empty)
        end = start + len(full) - len(empty)
        if end <= start or start < 1:
            raise ValueError(f"the follow-up {followup!r} has no tokens of its own in this chat template")
        return full[:end], start

    async def _followup(self, ids: list[int], start: int, ctx: RequestContext) -> float:
        async def run() -> float:
            ctx.engine_requests += 1
            ctx.prompt_tokens += len(ids)
            try:
                total, count = await self.engine.prompt_logprobs(ids, start=start, **ctx.engine_args())
            finally:
                ctx.engine_done()
            return total / count

        return await self._cached(ctx, self._cache_key(ctx, "followup", ids, [], start), run)

    async def rate(self, prompt: Prompt, response, ctx: RequestContext, **_) -> Rating:
        try:
            messages = (
                [{"role": "user", "content": prompt}]
                if isinstance(prompt, str)
                else [m.model_dump() for m in prompt]
            )
            messages.append({"role": "assistant", "content": response})
            positive, negative = self.settings.followups_positive, self.settings.followups_negative
            spans = await self.engine.tokenize(
                lambda: [self._span(messages, f) for f in [*positive, *negative]],
                ctx.tokenize_priority(),
            )
            values = await asyncio.gather(
                *[self._followup(self._fit(ids), start, ctx) for ids, start in spans]
            )
        except NOT_PER_ITEM:  # not a per-item cause: the request fails (503)
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        pos, neg = values[: len(positive)], values[len(positive) :]
        score = sum(pos) / len(pos) - sum(neg) / len(neg)
        return Rating(score, logit=score)

    def validate(self, where: str, prompt: Prompt, response) -> None:
        if image_parts(response) or (
            not isinstance(prompt, str) and any(image_parts(m.content) for m in prompt)
        ):
            raise ValueError(f"{where}: a followup judge scores text only; send text")
