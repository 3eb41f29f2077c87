"""Process reward models: a score for every step of a solution (``kind: prm``).

Reasoning RL scores the steps of a solution, not only the whole (Lightman et al. 2023, "Let's
Verify Step by Step", arXiv:2305.20050; the Qwen2.5-Math-PRM family, Zhang et al. 2025, "The
Lessons of Developing Process Reward Models", arXiv:2501.07301). A PRM is a token classifier read
at a step-separator token placed after each step: the probability of its positive label there is
the step's score. vLLM serves such models with its pooling runner (``token_classify``).

The input, as those models were trained on: the question as the user's turn (after an optional
system prompt), then the assistant's turn made of the steps, each followed by the separator. The
steps are the response split on ``step_delimiter`` ("\\n\\n" by default), or, for a response given
as a list (``{"steps": [...]}``, ``referee.protocol.Steps``), that list as it is: never split again,
so a step may hold the delimiter's text, and one score per step given (an empty step is a 422, not
dropped). Its ``step_spans`` index the steps joined with ``step_delimiter``, where the text form
would have put them. The steps are user data like every response (never control tokens), and the
separators are placed here, by id. One reward per response is the steps' ``aggregate``:
``min`` by default (a solution is as sound as its weakest step, and the minimum does not fall with
the number of steps as the product does; both are Lightman et al.'s aggregates), or ``last``,
``mean``, ``product``. ``/pairwise`` and ``/winrate`` compare the aggregates (Bradley-Terry).
"""

from __future__ import annotations

import math
import statistics
from typing import ClassVar, Literal

from pydantic import Field

from referee.protocol import Prompt, Steps, content_text

from ..engine_types import NOT_PER_ITEM
from ..judge_settings import EngineJudgeSettings
from .base import Judge, JudgeConfigError, Rating, RequestContext, _describe

Aggregate = Literal["min", "last", "mean", "product"]


class PRMSettings(EngineJudgeSettings):
    kind: Literal["prm"] = "prm"
    step_separator: str = Field(
        "<extra_0>",
        description="The model's step-separator token, placed after each step (one token of its "
        "tokenizer; Qwen2.5-Math-PRM: <extra_0>).",
    )
    step_delimiter: str = Field("\n\n", min_length=1, description="What separates the steps of a response.")
    positive_label: int = Field(1, ge=0, description="The output whose probability is a step's score.")
    aggregate: Aggregate = Field("min", description="One reward per response from its step scores.")
    max_steps: int = Field(128, ge=1, description="Steps one response may have (422 above).")
    system_prompt: str | None = Field(
        None,
        description="A system turn before the question, as the model was trained with (Qwen2.5-Math-PRM: "
        "'Please reason step by step, and put your final answer within \\\\boxed{}.').",
    )


def aggregate(scores: list[float], how: str) -> float:
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "mean":
        return statistics.fmean(scores)
    if how == "product":
        return math.prod(scores)
    raise ValueError(f"unknown aggregate {how!r}: use min, last, mean or product")


def split_steps(text: str, delimiter: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The non-empty steps of a response and each one's character span in it."""
    steps, spans, start = [], [], 0
    for part in text.split(delimiter):
        end = start + len(part)
        if part.strip():
            steps.append(part)
            spans.append((start, end))
        start = end + len(delimiter)
    return steps, spans


def steps_of(response, delimiter: str) -> tuple[list[str], list[tuple[int, int]]]:
    """A response's steps and their spans: a ``Steps`` list as given (spans in its steps joined
    with ``delimiter``), text split on ``delimiter``."""
    if not isinstance(response, Steps):
        return split_steps(content_text(response), delimiter)
    spans, start = [], 0
    for step in response.steps:
        spans.append((start, start + len(step)))
        start += len(step) + len(delimiter)
    return list(response.steps), spans


class PRMJudge(Judge):
    """A process reward model: step scores and their aggregate per response; pointwise."""

    settings: PRMSettings
    runner: ClassVar[str | None] = "pooling"

    def __post_init__(self) -> None:
        tokenizer = self.engine.tokenizer
        sep = self.settings.step_separator
        ids = tokenizer.convert_tokens_to_ids(sep)
        if not isinstance(ids, int) or ids == tokenizer.unk_token_id or ids is None:
            raise JudgeConfigError(
                f"judge {self.name!r}: the step separator {sep!r} is not one token of "
                f"{self.settings.model}'s tokenizer; set step_separator to the model's"
            )
        self.separator_id = ids
        if not tokenizer.chat_template:
            raise JudgeConfigError(f"judge {self.name!r}: {self.settings.model} has no chat template")

    def rating_options(self, req) -> dict:
        how = getattr(req, "aggregate", None)
        return {"how": how} if how else {}

    def pair_options(self, req) -> dict:
        return {}

    def validate(self, where: str, prompt: Prompt, response) -> None:
        listed = isinstance(response, Steps)
        steps, _ = steps_of(response, self.settings.step_delimiter)
        if not steps:
            how = "give at least one step" if listed else f"separated by {self.settings.step_delimiter!r}"
            raise ValueError(
                f"{where}: no steps (a process reward model scores the steps of a solution; {how})"
            )
        if len(steps) > self.settings.max_steps:
            raise ValueError(
                f"{where}: {len(steps)} steps, over this judge's max_steps of {self.settings.max_steps}"
            )
        sep = self.settings.step_separator
        for k, step in enumerate(steps):
            if listed and not step.strip():
                raise ValueError(f"{where}.steps[{k}] is empty: every step given in a list is scored")
            if sep in step:
                if listed:
                    raise ValueError(
                        f"{where}.steps[{k}] contains the step separator {sep!r}, which the judge places "
                        "after each step itself: leave it out"
                    )
                raise ValueError(
                    f"{where}: step {k} contains the step separator {sep!r}; "
                    f"separate steps with {self.settings.step_delimiter!r} only"
                )

    def _input(self, prompt: Prompt, steps: list[str]) -> tuple[list[int], list[int]]:
        """The model's input and the separators' positions in it."""
        messages = [] if self.settings.system_prompt is None else [
            {"role": "system", "content": self.settings.system_prompt}
        ]  # fmt: skip
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        else:
            messages += [m.model_dump() for m in prompt]
        ids = list(self.engine.chat_ids(messages, generation_prompt=True))
        positions = []
        for step in steps:
            ids += self.engine.prompts.data_ids(step)
            positions.append(len(ids))
            ids.append(self.separator_id)
        return ids, positions

    async def rate(self, prompt: Prompt, response, ctx: RequestContext, *, how: str | None = None) -> Rating:
        how = how or self.settings.aggregate
        steps, spans = steps_of(response, self.settings.step_delimiter)
        try:
            if not steps:
                raise ValueError(f"no steps (separate them with {self.settings.step_delimiter!r})")
            ids, positions = await self.engine.tokenize(
                lambda: self._input(prompt, steps), ctx.tokenize_priority()
            )
            self._fit(ids)

            async def run():
                ctx.engine_requests += 1
                ctx.prompt_tokens += len(ids)
                try:
                    return await self.engine.step_probs(ids, self.separator_id, **ctx.engine_args())
                finally:
                    ctx.engine_done()

            probs = await self._cached(ctx, self._cache_key(ctx, "step_probs", ids, [], None), run)
            label = self.settings.positive_label
            if len(probs) != len(positions) or any(len(row) <= label for row in probs):
                raise ValueError(
                    f"the model returned {len(probs)} step rows for {len(positions)} steps, or rows "
                    f"without a label {label}"
                )
            scores = [row[label] for row in probs]
        except NOT_PER_ITEM:
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        return Rating(aggregate(scores, how), step_scores=scores, step_spans=spans)
