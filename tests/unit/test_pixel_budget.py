"""The decoded-pixel budget of all admitted requests (media.max_decoded_pixels): many requests each
within media.max_request_pixels must not hold more decoded images than the budget between them, and
one tenant must not hold the whole of it."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from reward_server.media import MediaError, PixelBudget
from reward_server.settings import MediaSettings


async def _held_then(budget: PixelBudget, pixels: int, tenant: str, order: list, gate: asyncio.Event):
    async with budget.hold(pixels, tenant, timeout_s=10):
        order.append((tenant, pixels, budget.used))
        await gate.wait()


async def test_requests_beyond_the_total_wait_for_room_and_the_total_is_never_exceeded():
    budget = PixelBudget(100)
    order: list = []
    gates = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(_held_then(budget, 40, "t", order, g)) for g in gates]
    await asyncio.sleep(0.05)
    assert [o[2] for o in order] == [40, 80]  # the third does not fit: it waits
    assert budget.used == 80
    gates[0].set()
    await asyncio.sleep(0.05)
    assert len(order) == 3 and max(o[2] for o in order) <= 100
    for g in gates:
        g.set()
    await asyncio.gather(*tasks)
    assert budget.used == 0 and not budget.by_tenant


async def test_one_tenant_holds_at_most_its_share_and_another_still_finds_room():
    budget = PixelBudget(100, share=0.5)
    order: list = []
    gate = asyncio.Event()
    hog = [asyncio.create_task(_held_then(budget, 30, "a", order, gate)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert [o[0] for o in order] == ["a"]  # a's second 30 would pass its share of 50
    other = asyncio.create_task(_held_then(budget, 50, "b", order, gate))
    await asyncio.sleep(0.05)
    assert [o[0] for o in order] == ["a", "b"] and budget.used == 80
    gate.set()
    await asyncio.gather(*hog, other)
    assert budget.used == 0


async def test_a_request_that_can_never_fit_is_413_and_one_that_waits_too_long_is_429():
    budget = PixelBudget(100, share=0.5)
    with pytest.raises(MediaError) as never:
        async with budget.hold(60, "a", timeout_s=1):
            pass
    assert never.value.status == 413 and "max_decoded_pixels" in never.value.message
    gate = asyncio.Event()
    holder = asyncio.create_task(_held_then(budget, 50, "a", [], gate))
    await asyncio.sleep(0.02)
    with pytest.raises(MediaError) as busy:
        async with budget.hold(10, "a", timeout_s=0.05):
            pass
    assert busy.value.status == 429 and busy.value.code == "overloaded"
    async with budget.hold(10, "b", timeout_s=1):  # another tenant is not held up
        assert budget.used == 60
    gate.set()
    await holder
    assert budget.used == 0


async def test_a_cancelled_waiter_takes_nothing():
    budget = PixelBudget(10)
    gate = asyncio.Event()
    holder = asyncio.create_task(_held_then(budget, 10, "a", [], gate))
    await asyncio.sleep(0.02)
    waiter = asyncio.create_task(_held_then(budget, 5, "b", [], asyncio.Event()))
    await asyncio.sleep(0.02)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set()
    await holder
    assert budget.used == 0 and not budget.by_tenant


def test_the_decoded_budget_must_hold_one_request():
    with pytest.raises(ValidationError, match="max_decoded_pixels"):
        MediaSettings(max_request_pixels=1000, max_decoded_pixels=999)
    assert MediaSettings().max_decoded_pixels >= MediaSettings().max_request_pixels
