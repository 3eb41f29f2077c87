"""Sequence-classification reward models (``kind: classifier``)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field

from referee.protocol import Prompt
from referee.rewards import bradley_terry

from ..engine_types import NOT_PER_ITEM
from ..judge_settings import EngineJudgeSettings
from .base import Judge, JudgeConfigError, Rating, RequestContext, _describe


class ClassifierSettings(EngineJudgeSettings):
    kind: Literal["classifier"] = "classifier"
    activation: Literal["none", "sigmoid"] = Field(
        "none", description="Classifier scores are raw logits unless this asks for a sigmoid."
    )
    weights: dict[str, float] | None = Field(
        None,
        description="Multi-objective classifiers: the weight of each named objective (its id2label "
        "name) in the reward; objectives not named weigh 0. Default: equal weights.",
    )


class ClassifierJudge(Judge):
    """A sequence-classification reward model: one raw logit per (prompt, response). Pairwise
    questions are Bradley-Terry on the two scores; no generation involved.

    A multi-objective reward model (several named outputs, as ArmoRM's nineteen objectives or the
    HelpSteer attributes; Wang et al. 2024, "Interpretable Preferences via Multi-Objective Reward
    Modeling and Mixture-of-Experts"; Directional Preference Alignment, Wang et al. 2024) returns
    every objective, and its reward is their weighted sum: the judge's ``weights`` (default: equal),
    a request's ``weights``, or one ``objective`` alone."""

    settings: ClassifierSettings
    runner: ClassVar[str | None] = "pooling"

    def __post_init__(self) -> None:
        self.engine.prompts  # noqa: B018 -- fails at start-up where user text cannot be kept out of control
        labels = getattr(self.engine, "output_labels", None) or []
        self.objectives = tuple(labels) if len(labels) > 1 else ()
        weights = self.settings.weights
        if weights and not self.objectives:
            raise JudgeConfigError(
                f"judge {self.name!r}: `weights` are for multi-objective reward models, and "
                f"{self.settings.model} has {len(labels) or 1} unnamed output(s)"
            )
        if weights:
            unknown = sorted(set(weights) - set(self.objectives))
            if unknown:
                raise JudgeConfigError(
                    f"judge {self.name!r}: weights name unknown objectives {unknown}; the model's "
                    f"objectives are {list(self.objectives)}"
                )
        self.weights = weights or {name: 1.0 / len(self.objectives) for name in self.objectives}

    abilities: ClassVar[frozenset[str]] = frozenset({"formatted_text"})

    def combine(
        self, values: dict[str, float], objective: str | None, weights: dict[str, float] | None
    ) -> float:
        if objective is not None:
            return values[objective]
        return sum(w * values[name] for name, w in (weights or self.weights).items())

    def _messages_ids(self, messages: list[dict]) -> list[int]:
        """Every message content is user data: never a special token (see ``tokens``)."""
        if self.engine.tokenizer.chat_template:
            return self.engine.chat_ids(messages, generation_prompt=False)
        return self.engine.plain_ids([m["content"] for m in messages])

    def _input_ids(self, prompt: Prompt, response: str) -> list[int]:
        messages = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else [m.model_dump() for m in prompt]
        )
        messages.append({"role": "assistant", "content": response})
        return self._messages_ids(messages)

    async def rate_text(
        self,
        text: str,
        ctx: RequestContext,
        *,
        activation: bool | None = None,
        add_special_tokens: bool = True,
        response: str = "",
    ) -> Rating:
        """Score text that is already formatted for the model (vLLM /classify and OpenRLHF inputs):
        its special tokens are the client's template, its BOS appears once; ``response``, appended
        to it, is user data (OpenRLHF's response part)."""
        return await self._classify(
            lambda: self.engine.text_ids(text, add_special_tokens, data=response), ctx, activation
        )

    async def rate_messages(
        self, messages: list[dict], ctx: RequestContext, *, activation: bool | None = None
    ) -> Rating:
        """Score a conversation (vLLM /classify's chat form) in the model's chat template."""
        return await self._classify(lambda: self._messages_ids(messages), ctx, activation)

    async def rate(self, prompt: Prompt, response: str, ctx: RequestContext, **opts) -> Rating:
        return await self._classify(lambda: self._input_ids(prompt, response), ctx, None, **opts)

    async def _classify(
        self,
        build_ids,
        ctx: RequestContext,
        activation: bool | None,
        objective: str | None = None,
        weights: dict[str, float] | None = None,
    ) -> Rating:
        """One forward pass gives both: the raw logit (what Bradley-Terry compares) and the score the
        caller asked for (the logit, or its sigmoid: vLLM's activation of a one-label classifier).
        A multi-objective model's raw reward is the weighted sum of its objectives (or one of them)."""
        if activation is None:
            activation = self.settings.activation == "sigmoid"
        objectives = None
        try:
            ids = self._fit(await self.engine.tokenize(build_ids, ctx.tokenize_priority()))
            several = bool(self.objectives)

            async def run():
                ctx.engine_requests += 1
                ctx.prompt_tokens += len(ids)
                try:
                    if several:
                        return await self.engine.classify_all(ids, **ctx.engine_args())
                    return await self.engine.classify(ids, activation=False, **ctx.engine_args())
                finally:
                    ctx.engine_done()

            kind = "classify_all" if several else "classify"
            out = await self._cached(ctx, self._cache_key(ctx, kind, ids, [], None), run)
            if several:
                if len(out) != len(self.objectives):
                    raise ValueError(
                        f"the classifier returned {len(out)} outputs for {len(self.objectives)} objectives"
                    )
                objectives = dict(zip(self.objectives, out, strict=True))
                logit = self.combine(objectives, objective, weights)
            else:
                logit = out
        except NOT_PER_ITEM:  # not a per-item cause: the request fails (503)
            raise
        except Exception as exc:
            return Rating(None, error=_describe(exc))
        if not math.isfinite(logit) or (objectives and not all(map(math.isfinite, objectives.values()))):
            return Rating(
                None, objectives=objectives, error=f"the classifier returned a non-finite score ({logit})"
            )
        return Rating(bradley_terry(logit, 0.0) if activation else logit, logit=logit, objectives=objectives)
