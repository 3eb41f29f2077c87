"""The HTTP layer's dependencies: what a route handler receives (the service built at start, the
caller, the idempotency cache, the group gatherer), as typed ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from .gathering import GroupGatherer
from .idempotency import IdempotencyCache
from .service import JudgeService
from .tenancy import Caller, authenticate


async def get_service(request: Request) -> JudgeService:  # async: no thread hop per request
    return request.app.state.service


async def get_idempotency(request: Request) -> IdempotencyCache:
    return request.app.state.idempotency


async def get_gatherer(request: Request) -> GroupGatherer:
    return request.app.state.gatherer


Service = Annotated[JudgeService, Depends(get_service)]
Who = Annotated[Caller, Depends(authenticate)]
Idempotency = Annotated[IdempotencyCache, Depends(get_idempotency)]
IdempotencyKey = Annotated[
    str | None, Header(description="Same key on a retry: the request is answered once, not judged twice.")
]
Gatherer = Annotated[GroupGatherer, Depends(get_gatherer)]
