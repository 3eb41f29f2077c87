"""verl's GenRM requests: ``/verl/v1/chat/completions``, the OpenAI chat route with ``model`` optional.

verl's reward loop hands a generative reward model's custom reward function a
``reward_router_address`` (``host:port``, no scheme), and the function posts an OpenAI chat request
to ``http://{reward_router_address}/v1/chat/completions`` and reads
``choices[0].message.content`` (verl's docs, ``docs/advance/reward_loop.rst``, and its test
``tests/experimental/reward_loop/reward_fn.py``, ``chat_complete``). verl's ``custom_reward_function.
reward_kwargs`` take precedence over the arguments the reward loop passes
(``verl/trainer/ppo/reward.py``, ``_call_with_kwargs``), so
``+custom_reward_function.reward_kwargs.reward_router_address=referee:8000`` sends those requests
to referee's ``/v1`` unchanged.

The example in verl's docs leaves ``model`` out: its router forwards to the vLLM server verl started
for the one reward model, and vLLM serves its only model then. referee serves several judges and its
``/v1`` needs ``model``; this route is the same route with ``model`` defaulting to the default judge
when it is generative, else to the only generative judge (with several and no ``model``: a 400 that
lists them). Point verl at it with ``reward_router_address=referee:8000/verl``. Everything else
(keys, the ``/k/<key>/`` path form, fair admission, limits, errors in OpenAI's shape) is ``/v1``'s.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import ValidationError

from . import openai_api
from .deps import Service, Who
from .errors import ClientError
from .http_errors import openai_error
from .service import JudgeService
from .tenancy import authenticate

router = APIRouter(prefix="/verl", tags=["compatibility"], dependencies=[Depends(authenticate)])


class OptionalModelChatRequest(openai_api.ChatCompletionRequest):
    model: str | None = None  # type: ignore[assignment]  # vLLM's rule: the served model if omitted


def chat_model(service: JudgeService) -> str:
    """The judge a chat request without ``model`` goes to."""
    default = service.settings.default_judge
    judge = service.judges.get(default)
    if judge is None or "chat" in judge.abilities:  # (not loaded yet: /v1 answers 503)
        return default
    generative = sorted(n for n, j in service.judges.items() if "chat" in j.abilities)
    if len(generative) == 1:
        return generative[0]
    raise ClientError(
        400,
        "model_required",
        f"the default judge {default!r} is a {judge.kind} judge and this server has "
        f"{len(generative)} generative judges {generative}: give `model`",
    )


def _invalid(exc: ValidationError) -> str:
    where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:10])
    return f"invalid request: {where}"


@router.post("/v1/chat/completions", summary="OpenAI chat completions for verl's GenRM (model optional)")
async def chat_completions(
    body: Annotated[dict[str, Any], Body()], request: Request, service: Service, caller: Who
):
    try:  # validated here, not by FastAPI, so that a bad body is an OpenAI-shaped 400 as on /v1
        req = OptionalModelChatRequest.model_validate(body)
        model = req.model or chat_model(service)
    except ValidationError as exc:
        return openai_error(400, "invalid_request", _invalid(exc))
    except ClientError as exc:
        return openai_error(exc.status, exc.code, exc.message, exc.headers)
    return await openai_api.chat_completions(req.model_copy(update={"model": model}), service, caller)
