"""Drop-in routes for trainers that already speak another reward server's protocol.

- ``POST /get_reward``: OpenRLHF's remote reward model (``--remote_rm_url http://host:8000/get_reward``).
  OpenRLHF posts ``{"query": [prompt+response, ...], "prompts": [...], "labels": [...]}`` and reads
  ``rewards`` (and ``scores``, ``extra_logs``). A classifier judge scores each query as it is
  (OpenRLHF has already applied the chat template); a generative judge rates the response part.
  ``?reward=winrate`` groups the queries by prompt (``referee.rewards.group_by_prompt``; a prompt
  with a single query is a 422) and returns Pref-GRPO win rates instead.
- ``POST /classify``: vLLM's classification route (``{"model", "input"}`` -> ``{"data": [{"index",
  "probs", ...}]}``), which verl's reward loop uses for discriminative reward models. As in vLLM, a
  one-label classifier's output goes through a sigmoid unless ``use_activation`` is false. Older vLLM
  called that field ``activation``, and older verl releases still send ``"activation": false`` for raw
  logits: it is accepted with the same meaning. Other fields are errors (422), not silently ignored.

Failures stay visible: an item the judge could not score makes OpenRLHF's request fail with a 502
naming the items (OpenRLHF has no way to receive "no reward"), and /classify does the same.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from referee.protocol import Message, ScoreItem, ScoreRequest, WinRateRequest
from referee.rewards import group_by_prompt

from .deps import Gatherer, Service, Who
from .errors import ClientError
from .questions import ClassifyQuestion
from .questions import split_queries as _split
from .slime_api import GroupOptions, gathered_win_rate
from .tenancy import authenticate

router = APIRouter(tags=["compatibility"], dependencies=[Depends(authenticate)])


class OpenRLHFRequest(BaseModel):
    query: list[str] = Field(min_length=1, description="Prompt and response, as the policy saw them.")
    prompts: list[str] | None = Field(None, description="The prompt part of each query.")
    labels: list[Any] | None = Field(None, description="Dataset labels, any JSON (passed through, unused).")


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


def _require_nonempty(texts: list[str], what: str) -> None:
    """An empty query is the caller's mistake (a 4xx), not the engine's: vLLM refuses an empty
    prompt, which would come back as a 502 that clients retry in vain."""
    empty = [k for k, t in enumerate(texts) if not t]
    if empty:
        raise ClientError(422, "invalid_request", f"{what} {empty[:10]} empty: give text to judge")


def _require_all(values: list[float | None], errors: list[str | None], what: str) -> list[float]:
    failed = [f"{k}: {e}" for k, (v, e) in enumerate(zip(values, errors, strict=True)) if v is None]
    if failed:
        raise ClientError(502, "judge_failed", f"the judge could not {what} items " + "; ".join(failed[:10]))
    return [v for v in values if v is not None]


@router.post("/get_reward", response_model=OpenRLHFResponse, summary="OpenRLHF remote reward model")
async def get_reward(
    req: OpenRLHFRequest,
    service: Service,
    caller: Who,
    gather: Gatherer,
    judge: str | None = None,
    reward: Annotated[
        Literal["score", "winrate"], Query(description="score, or win rate within a prompt")
    ] = "score",
    group_size: Annotated[
        int | None,
        Query(
            description="reward=winrate for a client that sends each sample as it finishes (OpenRLHF's "
            "agent executor): the number of samples per prompt; the server gathers them across calls."
        ),
    ] = None,
    group_timeout_s: Annotated[
        float, Query(gt=0, description="How long a group may take to fill up.")
    ] = 120.0,
    incomplete: Annotated[Literal["judge", "error"], Query()] = "judge",
    order: Annotated[Literal["single", "random", "both"], Query()] = "both",
    cache: Annotated[
        bool | None, Query(description="Use the judgment cache (default: the server's cache.default).")
    ] = None,
) -> OpenRLHFResponse:
    j = service.judge_for(judge, "score")
    service.check_items(len(req.query))  # the queries fan out into questions, each checked in full
    _require_nonempty(req.query, "query")
    if reward == "winrate" and group_size is not None:
        # Gathered across calls: each query waits for the rest of its prompt's group.
        options = GroupOptions(
            group_size=group_size, group_timeout_s=group_timeout_s, incomplete=incomplete, order=order
        )
        rewards = list(
            await asyncio.gather(
                *[
                    gathered_win_rate(service, gather, caller, j.name, prompt, response, options)
                    for prompt, response in _split(req.query, req.prompts)
                ]
            )
        )
    elif reward == "winrate":
        pairs = _split(req.query, req.prompts)
        groups = group_by_prompt([prompt for prompt, _ in pairs])
        alone = [idx[0] for idx in groups if len(idx) == 1]
        if alone:  # the caller's grouping, not the judge: a 4xx (a 5xx would be retried in vain)
            raise ClientError(
                422,
                "invalid_request",
                f"reward=winrate compares the responses to one prompt, and queries {alone[:10]} are the "
                "only response to their prompt: send at least two per prompt, give group_size=N (samples "
                "per prompt) so that the server gathers them across calls, or use reward=score",
            )
        values: list[float | None] = [None] * len(pairs)
        errors: list[str | None] = [None] * len(pairs)
        answers = await asyncio.gather(
            *[
                service.winrate(
                    WinRateRequest(
                        judge=j.name,
                        prompt=pairs[idx[0]][0],
                        responses=[pairs[i][1] for i in idx],
                        cache=cache,
                    ),
                    **caller.who(),
                )
                for idx in groups
            ]
        )
        for idx, answer in zip(groups, answers, strict=True):
            for i, rate in zip(idx, answer.win_rates, strict=True):
                values[i], errors[i] = rate, None if rate is not None else "; ".join(answer.errors)
        rewards = _require_all(values, errors, "compare")
    elif "formatted_text" in j.abilities:
        # The prompt part is the trainer's own chat template (special tokens parsed); the response
        # part is the policy's text, user data. Without `prompts` the query is one formatted text.
        q = ClassifyQuestion(judge=j.name, texts=req.query, prompts=req.prompts, where="query", cache=cache)
        answer = await service.ask(q, **caller.who())
        rewards = _require_all([r.score for r in answer.ratings], [r.error for r in answer.ratings], "score")
    else:
        items = [ScoreItem(prompt=p, response=r) for p, r in _split(req.query, req.prompts)]
        out = await service.score(ScoreRequest(judge=j.name, items=items, cache=cache), **caller.who())
        rewards = _require_all([r.score for r in out.results], [r.error for r in out.results], "score")
    return OpenRLHFResponse(rewards=rewards, scores=rewards, extra_logs={f"referee/{reward}": rewards})


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="A classifier judge's name or model; default judge if omitted."
    )
    input: str | list[str] | None = Field(
        None, description="Text already formatted for the model (its special tokens are parsed)."
    )
    messages: list[Message] | None = Field(
        None,
        description="As vLLM's chat form: one conversation, put in the model's chat template; the "
        "contents are data (never special tokens). Give `input` or `messages`.",
    )
    use_activation: bool | None = Field(
        None, description="As vLLM: false for the raw logit; true (the default) for its sigmoid."
    )
    activation: bool | None = Field(
        None,
        description="vLLM's earlier name for `use_activation` (older verl releases send "
        '`"activation": false`), with the same meaning; give one of the two, or the same value twice.',
    )
    add_special_tokens: bool = Field(
        True, description="As vLLM, for `input`: add the tokenizer's special tokens (BOS), once."
    )
    user: str | None = Field(None, description="As vLLM and OpenAI: the caller's label, not used.")
    cache: bool | None = Field(
        None,
        description="referee: use the judgment cache for these scores (default: the server's "
        "cache.default); usage.cached counts the scores it answered.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> ClassificationRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of `input` and `messages`")
        return self

    @model_validator(mode="after")
    def _one_activation(self) -> ClassificationRequest:
        if None not in (self.activation, self.use_activation) and self.activation != self.use_activation:
            raise ValueError(
                "`activation` (vLLM's earlier name for `use_activation`) and `use_activation` disagree: "
                "give one of them"
            )
        return self

    @property
    def wants_activation(self) -> bool:
        """Whether the scores go through the activation: vLLM's default is yes."""
        for value in (self.use_activation, self.activation):
            if value is not None:
                return value
        return True


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: dict[str, int]


@router.post("/classify", response_model=ClassificationResponse, summary="vLLM-compatible classification")
async def classify(req: ClassificationRequest, service: Service, caller: Who) -> ClassificationResponse:
    activation = req.wants_activation
    if req.messages is not None:
        q = ClassifyQuestion(
            judge=req.model, messages=req.messages, activation=activation, cache=req.cache, by_model=True
        )
    else:
        q = ClassifyQuestion(
            judge=req.model,
            texts=[req.input] if isinstance(req.input, str) else req.input,
            activation=activation,
            add_special_tokens=req.add_special_tokens,
            cache=req.cache,
            by_model=True,
        )
    answer = await service.ask(q, **caller.who())
    j, ratings = answer.judge, answer.ratings
    scores = _require_all([r.score for r in ratings], [r.error for r in ratings], "classify")
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=req.model or j.settings.model,
        data=[
            _classification(k, s, r.objectives, activation)
            for k, (s, r) in enumerate(zip(scores, ratings, strict=True))
        ],
        usage={
            "prompt_tokens": answer.usage.prompt_tokens,
            "total_tokens": answer.usage.prompt_tokens,
            "cached": answer.usage.cached,
        },
    )


def _classification(
    index: int, score: float, objectives: dict[str, float] | None, activation: bool
) -> ClassificationData:
    """As vLLM answers: one label's score, or every label of a multi-output model (a softmax over them
    unless the activation is off) with the top label named."""
    if not objectives:
        return ClassificationData(index=index, label="LABEL_0", probs=[score], num_classes=1)
    values = list(objectives.values())
    if activation:
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        values = [e / sum(exps) for e in exps]
    label = max(objectives, key=objectives.get)
    return ClassificationData(index=index, label=label, probs=values, num_classes=len(values))
