"""slime's remote reward model, and group gathering for every one-sample-per-call client.

slime (``--rm-type remote_rm --rm-url http://host:8000/slime/reward``) posts one sample per call,
``{"prompt": ..., "response": ..., "label": ...}`` (``slime/rollout/rm_hub/__init__.py``,
``remote_rm``), and uses the JSON body of the answer, a bare number, as the reward. Its prompt is a
text or chat messages; its label (a reference answer, for rule-based rewards) is accepted and unused.

``?reward=score`` (default) rates the sample with the judge: a classifier's logit, a generative
judge's expected rating. ``?reward=winrate&group_size=N`` gathers the samples of one prompt (per
tenant and job) until N arrived, judges the group once (``/winrate``, with ``order`` and
``opponents`` as there), and answers each call with its own win rate; see ``gathering``. A sample is
checked (the judge, its texts' limits) before it is kept waiting, and what one tenant keeps waiting
is bounded (``limits.tenant_share`` of the open groups, ``limits.max_gathered_bytes``).
A sample the judge could not score gets 502 with the reason (slime then retries and raises:
it has no way to receive "no reward", and a silent 0 would be the worst reward).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict

from referee.protocol import Message, ScoreItem, ScoreRequest, WinRateRequest

from .deps import Gatherer, Service, Who
from .errors import ClientError
from .gathering import GatherRefused, GroupGatherer, GroupIncomplete, TenantBounds
from .questions import prompt_texts
from .service import JudgeService
from .tenancy import Caller, authenticate

router = APIRouter(tags=["compatibility"], dependencies=[Depends(authenticate)])


class SlimeSample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[Message]
    response: str
    label: Any = None


class GroupOptions(BaseModel):
    """How a one-sample-per-call client's samples are gathered into groups (query parameters)."""

    group_size: int | None = None
    group_timeout_s: float = 120.0
    incomplete: Literal["judge", "error"] = "judge"
    order: Literal["single", "random", "both"] = "both"
    opponents: int | None = None


def check_sample(service: JudgeService, prompt, response: str) -> None:
    """The limits a gathered sample's texts must keep, checked before it waits for its group (its
    group's /winrate checks them again, with the group's totals)."""
    limit = service.limits.max_messages
    if not isinstance(prompt, str) and len(prompt) > limit:
        raise ClientError(
            413,
            "too_large",
            f"prompt has {len(prompt)} chat messages, over the limit of {limit} (limits.max_messages); "
            "shorten the conversation",
        )
    service.check_texts([*prompt_texts("prompt", prompt), ("response", response)])


async def gathered_win_rate(
    service: JudgeService,
    gather: GroupGatherer,
    caller: Caller,
    judge: str | None,
    prompt,
    response: str,
    options: GroupOptions,
) -> float:
    """This response's win rate within its prompt's group, once the group is complete."""
    size = options.group_size
    if size is None or size < 2:
        raise ClientError(
            422,
            "bad_request",
            "reward=winrate compares the responses of one prompt: give group_size=N (N >= 2, the "
            "number of samples per prompt, e.g. n_samples_per_prompt) so that the server can gather them",
        )
    if size > service.limits.max_group_size:
        raise ClientError(
            413,
            "too_large",
            f"group_size={size} is over limits.max_group_size={service.limits.max_group_size}",
        )
    service.judge_for(judge, "winrate")  # a judge that cannot answer is refused now, not after waiting
    check_sample(service, prompt, response)
    key_prompt = prompt if isinstance(prompt, str) else json.dumps([m.model_dump() for m in prompt])
    key = (caller.tenant, caller.job, judge, key_prompt, size, options.order, options.opponents)
    limits = service.limits
    bounds = TenantBounds(
        groups=max(1, math.ceil(limits.tenant_share * gather.max_open)),
        nbytes=limits.max_gathered_bytes,
        share=limits.tenant_share,
    )

    async def judge_group(responses: list[str]) -> list[float | None]:
        req = WinRateRequest(
            judge=judge, prompt=prompt, responses=responses, order=options.order, opponents=options.opponents
        )
        out = await service.winrate(req, **caller.who())
        return out.win_rates

    try:
        rate = await gather.submit(
            key,
            response,
            size=size,
            timeout_s=min(options.group_timeout_s, service.limits.request_timeout_s),
            judge=judge_group,
            incomplete=options.incomplete,
            tenant=caller.tenant,
            nbytes=len(key_prompt.encode()) + len(response.encode()),
            bounds=bounds,
        )
    except GatherRefused as exc:
        raise ClientError(429, exc.code, exc.message, {"Retry-After": "5"}) from None
    except GroupIncomplete as exc:
        raise ClientError(504, "group_incomplete", str(exc)) from None
    except ValueError as exc:
        raise ClientError(409, "group_mismatch", str(exc)) from None
    if rate is None:
        raise ClientError(502, "unscorable", "none of this response's comparisons gave a valid verdict")
    return rate


@router.post("/slime/reward", summary="slime's remote reward model (one sample -> a number)")
async def slime_reward(
    sample: SlimeSample,
    service: Service,
    gather: Gatherer,
    caller: Who,
    judge: Annotated[str | None, Query(description="A loaded judge; the default if omitted.")] = None,
    reward: Annotated[Literal["score", "winrate"], Query()] = "score",
    group_size: Annotated[int | None, Query(description="reward=winrate: samples per prompt.")] = None,
    group_timeout_s: Annotated[
        float, Query(gt=0, description="How long a group may take to fill up.")
    ] = 120.0,
    incomplete: Annotated[Literal["judge", "error"], Query()] = "judge",
    order: Annotated[Literal["single", "random", "both"], Query()] = "both",
    opponents: Annotated[int | None, Query(ge=1)] = None,
) -> float:
    if reward == "winrate":
        options = GroupOptions(
            group_size=group_size, group_timeout_s=group_timeout_s, incomplete=incomplete, order=order,
            opponents=opponents,
        )  # fmt: skip
        return await gathered_win_rate(
            service, gather, caller, judge, sample.prompt, sample.response, options
        )
    out = await service.score(
        ScoreRequest(judge=judge, items=[ScoreItem(prompt=sample.prompt, response=sample.response)]),
        **caller.who(),
    )
    result = out.results[0]
    if result.score is None:
        raise ClientError(502, "unscorable", f"the judge could not score this sample: {result.error}")
    return result.score
