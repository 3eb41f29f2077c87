"""Which backend a remote judge's call goes to (reward_server.remote): one request's calls stay on one
backend (rendezvous hashing of REQUEST_AFFINITY), requests spread over the backends, a backend taken
out moves only its own requests, a backend far busier than the least busy is passed over; and the
health-check timer that brings a returned backend back without traffic, cancelled on shutdown. The
backends are httpx mock transports."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from reward_server.engine_types import REQUEST_AFFINITY
from reward_server.judge_settings import RemoteSettings
from reward_server.remote import RemoteEngine

URLS = [f"http://b{k}" for k in range(4)]


def _engine(urls=URLS, handler=None, **settings) -> RemoteEngine:
    remote = RemoteSettings(urls=list(urls), **{"backoff_s": 0.0, "open_s": 60.0, **settings})
    engine = RemoteEngine(None, "model", "generate", remote, 2048)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"host": request.url.host})

    for b in engine.backends:
        b.client = httpx.AsyncClient(base_url=b.url, transport=httpx.MockTransport(handler or answer))
    return engine


def _pick(engine: RemoteEngine, key: str | None) -> str:
    token = REQUEST_AFFINITY.set(key)
    try:
        return engine._choose(set()).url
    finally:
        REQUEST_AFFINITY.reset(token)


async def test_one_request_keeps_to_one_backend():
    engine = _engine()
    token = REQUEST_AFFINITY.set("group-1")
    try:
        hosts = await asyncio.gather(*[engine._post("/x", {}, 1) for _ in range(24)])
    finally:
        REQUEST_AFFINITY.reset(token)
    assert len({h["host"] for h in hosts}) == 1
    # and the same key is routed the same way again, by another engine (another replica) too
    assert _pick(engine, "group-1") == _pick(_engine(), "group-1") == f"http://{hosts[0]['host']}"


async def test_requests_spread_over_the_backends():
    engine = _engine()
    counts = Counter(_pick(engine, f"request-{k}") for k in range(400))
    assert set(counts) == set(URLS)
    assert min(counts.values()) >= 50  # about 100 each


async def test_a_backend_out_moves_its_own_requests_only():
    engine = _engine()
    keys = [f"request-{k}" for k in range(200)]
    before = {k: _pick(engine, k) for k in keys}
    gone = engine.backends[1]
    gone.state = "out"
    after = {k: _pick(engine, k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone.url for k in moved)
    assert all(after[k] != gone.url for k in keys)
    assert sum(before[k] == gone.url for k in keys) == len(moved)
    gone.state = "up"  # back: its requests return to it
    assert {k: _pick(engine, k) for k in keys} == before


async def test_a_retry_goes_to_the_requests_next_backend():
    engine = _engine()
    first = _pick(engine, "request-7")
    token = REQUEST_AFFINITY.set("request-7")
    try:
        second = engine._choose({first}).url
    finally:
        REQUEST_AFFINITY.reset(token)
    next(b for b in engine.backends if b.url == first).state = "out"
    assert second != first and _pick(engine, "request-7") == second


async def test_a_backend_far_busier_than_the_least_busy_is_passed_over():
    engine = _engine(affinity_max_skew=4)
    key = "request-3"
    mine = next(b for b in engine.backends if b.url == _pick(engine, key))
    mine.inflight = 4  # 4 beyond the others' 0: still its own
    assert _pick(engine, key) == mine.url
    mine.inflight = 5  # over the skew: the least busy instead
    assert _pick(engine, key) != mine.url
    for b in engine.backends:
        if b is not mine:
            b.inflight = 3  # the least busy is now 3 behind: its own again
    assert _pick(engine, key) == mine.url


async def test_without_a_key_or_with_affinity_off_the_least_busy_is_chosen():
    for engine, key in ((_engine(), None), (_engine(affinity=False), "request-1")):
        for b in engine.backends:
            b.inflight = 10
        engine.backends[2].inflight = 1
        assert _pick(engine, key) == engine.backends[2].url


async def test_calls_waiting_for_a_slot_count_as_busy():
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json={})

    engine = _engine(urls=URLS[:1], max_concurrency=1)
    (b,) = engine.backends
    b.client = httpx.AsyncClient(base_url=b.url, transport=httpx.MockTransport(slow))
    calls = [asyncio.create_task(engine._post("/x", {}, 1)) for _ in range(3)]
    for _ in range(100):
        if b.inflight == 3:
            break
        await asyncio.sleep(0.01)
    assert b.inflight == 3  # one holding the slot, two waiting for it
    release.set()
    await asyncio.gather(*calls)
    assert b.inflight == 0


async def test_the_timer_brings_a_returned_backend_back_without_traffic():
    healthy = {"now": False}
    checks = []

    def backend(request: httpx.Request) -> httpx.Response:
        checks.append(request.url.path)
        return httpx.Response(200 if healthy["now"] else 503)

    engine = _engine(urls=URLS[:2], handler=backend, health_interval_s=0.01, open_s=0.01)
    a, _ = engine.backends
    a.state, a.open_until = "out", 0.0
    engine.watch()
    for _ in range(500):  # checked, and still out while it answers 503
        if checks.count("/health") >= 2:
            break
        await asyncio.sleep(0.01)
    assert a.state == "out" and checks.count("/health") >= 2
    assert "health check answered 503" in a.last_error
    healthy["now"] = True
    for _ in range(500):
        if a.state == "up":
            break
        await asyncio.sleep(0.01)
    assert a.state == "up" and a.last_error is None
    assert all(path == "/health" for path in checks)  # no request was needed to find it
    timer = engine._watching
    engine.watch()  # once per engine
    assert engine._watching is timer
    engine.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await timer
    assert timer.cancelled()


async def test_shutdown_cancels_a_health_check_under_way():
    started = asyncio.Event()

    async def hangs(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    engine = _engine(urls=URLS[:1], handler=hangs, health_interval_s=0.01)
    (a,) = engine.backends
    a.state, a.open_until = "out", 0.0
    engine.watch()
    await asyncio.wait_for(started.wait(), 30)
    timer = engine._watching
    engine.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await timer
    assert a.checking is False  # the check was cancelled, not left marked as running
