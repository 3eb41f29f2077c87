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

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from referee.protocol import Message, ScoreItem, ScoreRequest, WinRateRequest
from referee.rewards import group_by_prompt

from .judges import ClassifierJudge, RequestContext
from .service import ClientError, JudgeService
from .slime_api import Gatherer, GroupOptions, gathered_win_rate
from .tenancy import Caller, authenticate


def _service(request: Request) -> JudgeService:
    return request.app.state.service


Service = Annotated[JudgeService, Depends(_service)]
Who = Annotated[Caller, Depends(authenticate)]
router = APIRouter(tags=["compatibility"], dependencies=[Depends(authenticate)])


class OpenRLHFRequest(BaseModel):
    query: list[str] = Field(min_length=1, description="Prompt and response, as the policy saw them.")
    prompts: list[str] | None = Field(None, description="The prompt part of each query.")
    labels: list[Any] | None = Field(None, description="Dataset labels, any JSON (passed through, unused).")


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


def _lstrip_all(text: str, prefix: str | None) -> str:
    while prefix and text.startswith(prefix):
        text = text[len(prefix) :]
    return text


def _split(queries: list[str], prompts: list[str] | None, bos: str | None = None) -> list[tuple[str, str]]:
    """(prompt, response) of each query. Leading BOS texts are not compared: OpenRLHF's decoded
    query carries a BOS more than the prompt when the tokenizer added one to a templated prompt."""
    if prompts is None:
        raise ClientError(
            422, "invalid_request", "a generative judge needs `prompts` to tell prompt from response"
        )
    if len(prompts) != len(queries):
        raise ClientError(422, "invalid_request", f"{len(queries)} queries but {len(prompts)} prompts")
    pairs = []
    for k, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        bare_query, bare_prompt = _lstrip_all(query, bos), _lstrip_all(prompt, bos)
        if not bare_query.startswith(bare_prompt):
            raise ClientError(422, "invalid_request", f"query[{k}] does not start with prompts[{k}]")
        cut = len(query) - len(bare_query) + len(bare_prompt)
        pairs.append((query[:cut], query[cut:]))
    return pairs


def _require_nonempty(texts: list[str], what: str) -> None:
    """An empty text is the caller's mistake (a 4xx), not the engine's: vLLM refuses an empty prompt,
    which would come back as a 502 that clients retry in vain."""
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
) -> OpenRLHFResponse:
    j = service.judge_for(judge, "score")
    service.check_items(len(req.query))
    service.check_texts((f"query[{k}]", q) for k, q in enumerate(req.query))
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
                        judge=j.name, prompt=pairs[idx[0]][0], responses=[pairs[i][1] for i in idx]
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
    elif isinstance(j, ClassifierJudge):
        # The prompt part is the trainer's own chat template (special tokens parsed); the response
        # part is the policy's text, user data. Without `prompts` the query is one formatted text.
        parts = (
            [(q, "") for q in req.query]
            if req.prompts is None
            else _split(req.query, req.prompts, j.engine.tokenizer.bos_token)
        )
        ctx = RequestContext()
        async with service.admit(len(req.query), ctx, **caller.who()):
            ratings = await asyncio.gather(*[j.rate_text(p, ctx, response=r) for p, r in parts])
        rewards = _require_all([r.score for r in ratings], [r.error for r in ratings], "score")
    else:
        items = [ScoreItem(prompt=p, response=r) for p, r in _split(req.query, req.prompts)]
        out = await service.score(ScoreRequest(judge=j.name, items=items), **caller.who())
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
    name = req.model
    if name is not None and name not in service.judges:  # also accept the judge's configured model
        name = next((n for n, j in service.judges.items() if j.settings.model == name), name)
    j = service.judge_for(name, "score")
    if not isinstance(j, ClassifierJudge):
        raise ClientError(400, "unsupported", f"judge {j.name!r} is not a classifier; /classify needs one")
    activation = req.wants_activation
    ctx = RequestContext()
    if req.messages is not None:
        service.check_texts((f"messages[{k}].content", m.content) for k, m in enumerate(req.messages))
        async with service.admit(1, ctx, **caller.who()):
            ratings = [
                await j.rate_messages([m.model_dump() for m in req.messages], ctx, activation=activation)
            ]
    else:
        texts = [req.input] if isinstance(req.input, str) else req.input
        service.check_items(len(texts))
        service.check_texts((f"input[{k}]", t) for k, t in enumerate(texts))
        _require_nonempty(texts, "input")
        async with service.admit(len(texts), ctx, **caller.who()):
            ratings = await asyncio.gather(
                *[
                    j.rate_text(t, ctx, activation=activation, add_special_tokens=req.add_special_tokens)
                    for t in texts
                ]
            )
    scores = _require_all([r.score for r in ratings], [r.error for r in ratings], "classify")
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=req.model or j.settings.model,
        data=[
            _classification(k, s, r.objectives, activation)
            for k, (s, r) in enumerate(zip(scores, ratings, strict=True))
        ],
        usage={"prompt_tokens": ctx.prompt_tokens, "total_tokens": ctx.prompt_tokens},
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
