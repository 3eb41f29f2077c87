"""An OpenAI-compatible face for generative judges: ``/v1/chat/completions``, ``/v1/completions``
and ``/v1/models``.

Most hand-written reward functions (verl's GenRM recipe, verifiers' ``JudgeRubric``, NeMo Gym judge
servers) call a judge through the OpenAI client. Served here, those calls share the engines with
the native routes and go through the same edge (keys, body limits, metrics), the same fair
admission between tenants and jobs, and the same media handling (``image_url`` parts with ``data:``
URLs, or referee's uploaded blobs). ``model`` is a judge's name (or its model path); only
generative judges chat.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so that the client
raises its own exception types (``BadRequestError``, ``RateLimitError``, ...).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import AsyncExitStack
from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from referee.protocol import Content

from .deps import Service, Who
from .engine import EngineDead
from .errors import ClientError
from .http_errors import openai_error, stream_error
from .questions import GenerateQuestion
from .service import JudgeService
from .tenancy import Caller, authenticate

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(authenticate)])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: Content | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The OpenAI sampling fields referee passes to vLLM; any other field is an error (400)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


def _params(service: JudgeService, req: _Sampling, logprobs: int | None) -> dict:
    """The request's sampling parameters as vLLM takes them (their bounds: ``GenerateQuestion.check``)."""
    max_tokens = req.max_completion_tokens or req.max_tokens or min(service.limits.max_new_tokens, 256)
    params = {"max_tokens": max_tokens, "n": req.n}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop"):
        if (value := getattr(req, name)) is not None:
            params[name] = value
    if logprobs is not None:
        params["logprobs"] = logprobs
    return params


def _token_logprobs(tokenizer, choice, top: int) -> list[dict]:
    """OpenAI's ``logprobs.content``: each generated token, its log-probability and the top ones."""
    rows = []
    for tid, alternatives in zip(choice.token_ids, choice.logprobs or [], strict=False):
        chosen = alternatives.get(tid)
        token = tokenizer.decode([tid])
        ranked = sorted(alternatives.items(), key=lambda kv: kv[1].rank or 0)[:top]
        rows.append(
            {
                "token": token,
                "logprob": chosen.logprob if chosen else None,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {
                        "token": (t := lp.decoded_token or tokenizer.decode([i])),
                        "logprob": lp.logprob,
                        "bytes": list(t.encode()),
                    }
                    for i, lp in ranked
                ],
            }
        )
    return rows


async def _run(service: JudgeService, caller: Caller, q: GenerateQuestion, stream: bool):
    """The question through the pipeline up to admission (the caller's fair share), then the
    engine's outputs; the admission is held until the outputs are consumed (``stack``)."""
    stack = AsyncExitStack()
    judge, ctx = await stack.enter_async_context(service.session(q, **caller.who()))
    try:
        await q.tokens(judge, ctx)
    except BaseException:
        await stack.aclose()
        raise
    stream_of = q.outputs(judge, ctx, delta=stream)

    async def outputs():
        try:
            async for out in stream_of:
                yield out
        finally:
            for _ in range(q.params["n"]):
                ctx.engine_done()

    # The first output (or the engine's refusal, e.g. a prompt longer than the model's context)
    # before anything is sent: a refusal is a 400, not an error in the middle of a 200 stream.
    gen = outputs()
    try:
        first = await gen.__anext__()
    except (EngineDead, StopAsyncIteration):
        await stack.aclose()
        raise
    except Exception as exc:
        await stack.aclose()
        raise ClientError(400, "invalid_request", f"the engine refused the request: {exc}") from None

    async def replay():
        yield first
        async for out in gen:
            yield out

    return judge, ctx, stack, replay()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _complete(
    service,
    caller,
    q: GenerateQuestion,
    *,
    chat: bool,
    top: int | None,
    stream,
    include_usage,
    echo: str = "",
):
    created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    obj = "chat.completion" if chat else "text_completion"
    judge, ctx, stack, outputs = await _run(service, caller, q, stream)
    tokenizer, params, ids = judge.engine.tokenizer, q.params, q.ids

    if not stream:
        final = None
        try:
            async with stack:
                async for out in outputs:
                    final = out
        except EngineDead:
            raise
        except Exception as exc:  # a prompt too long for the model, ...
            raise ClientError(400, "invalid_request", f"the engine refused the request: {exc}") from None
        choices, completion_tokens = [], 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
        ctx.completion_tokens += completion_tokens
        service.record(q, judge, ctx, q.outcome(None, None))
        for c in final.outputs:
            logprobs = None
            if top is not None:
                # n x max_tokens x (top + 1) objects: built off the event loop
                content = await asyncio.to_thread(_token_logprobs, tokenizer, c, top)
                logprobs = {"content": content} if chat else {
                    "tokens": [r["token"] for r in content],
                    "token_logprobs": [r["logprob"] for r in content],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in r["top_logprobs"]} for r in content],
                    "text_offset": [],
                }  # fmt: skip
            choice = {"index": c.index, "finish_reason": c.finish_reason or "stop", "logprobs": logprobs}
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = echo + c.text
            choices.append(choice)
        body = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": judge.name,
            "choices": choices,
            "usage": _usage(len(ids), completion_tokens),
        }
        return JSONResponse(body)

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, usage: dict | None = None) -> str:
        body = {"id": rid, "object": chunk_obj, "created": created, "model": judge.name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        completion_tokens = 0
        try:
            async with stack:
                if chat:
                    yield event(
                        [
                            {"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            for k in range(params["n"])
                        ]
                    )
                async for out in outputs:
                    for c in out.outputs:
                        completion_tokens += len(c.token_ids)
                        if not c.text and c.finish_reason is None:
                            continue
                        delta = {"index": c.index, "finish_reason": c.finish_reason}
                        if chat:
                            delta["delta"] = {"content": c.text} if c.text else {}
                        else:
                            delta["text"] = c.text
                        yield event([delta])
        except EngineDead as exc:
            yield stream_error(503, "unavailable", str(exc))
        except Exception as exc:
            yield stream_error(400, "invalid_request", f"the engine refused the request: {exc}")
        ctx.completion_tokens += completion_tokens
        service.record(q, judge, ctx, q.outcome(None, None))
        if include_usage:
            yield event([], _usage(len(ids), completion_tokens))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/chat/completions", summary="OpenAI chat completions, served by a generative judge")
async def chat_completions(req: ChatCompletionRequest, service: Service, caller: Who):
    try:
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = _params(service, req, None if top is None else max(top, 1))
        q = GenerateQuestion(model=req.model, params=params, messages=req.messages)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await _complete(
            service, caller, q, chat=True, top=top, stream=req.stream, include_usage=include
        )
    except ClientError as exc:
        return openai_error(exc.status, exc.code, exc.message, exc.headers)


@router.post("/completions", summary="OpenAI text completions, served by a generative judge")
async def completions(req: CompletionRequest, service: Service, caller: Who):
    try:
        params = _params(service, req, req.logprobs)
        q = GenerateQuestion(model=req.model, params=params, prompt=req.prompt)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await _complete(
            service, caller, q, chat=False, top=req.logprobs, stream=req.stream, include_usage=include,
            echo=req.prompt if req.echo else "",
        )  # fmt: skip
    except ClientError as exc:
        return openai_error(exc.status, exc.code, exc.message, exc.headers)


@router.get("/models", summary="The judges, as OpenAI models")
async def models(service: Service):
    data = [
        {"id": cfg.name, "object": "model", "created": 0, "owned_by": "referee", "referee_kind": cfg.kind}
        for cfg in service.settings.judges
    ]
    return {"object": "list", "data": data}
