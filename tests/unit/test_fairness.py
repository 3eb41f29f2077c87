"""The fair scheduler's rules, as pure logic (no engine): the order it gives engine requests, the
admission it grants under contention, and the limits it enforces. The serving tests in
tests/serving/test_tenants.py check the same rules through a real server."""

from __future__ import annotations

import asyncio

import pytest

from reward_server.fairness import PRIORITY_SCALE, AdmissionRefused, FairScheduler, TenantPolicy


def _scheduler(max_inflight=1000, max_waiting=1000, tenant_share=None, **policies) -> FairScheduler:
    """A scheduler for the rules of order and limits; the default tenant share (which applies when
    several tenants are configured) only where a test turns it on."""
    policies = {k: TenantPolicy(**v) for k, v in policies.items()}
    return FairScheduler(max_inflight, max_waiting, policies, tenant_share=tenant_share)


async def _priorities(scheduler, tenant, job, n):
    """Admit one request of ``n`` engine requests and hand out all its priorities (held open)."""
    cm = scheduler.admit(tenant, job, n, wait=True)
    ticket = await cm.__aenter__()
    return cm, [(ticket.next_priority(), tenant, job) for _ in range(n)]


def _share(merged, first_n, key):
    top = sorted(merged)[:first_n]
    return sum(1 for p in top if key(p)) / first_n


async def test_busy_tenants_are_served_in_proportion_to_their_weights():
    s = _scheduler(a={"weight": 2.0}, b={"weight": 1.0})
    _, a = await _priorities(s, "a", "j", 300)
    _, b = await _priorities(s, "b", "j", 300)
    # The engine serves the lowest priorities first: of the first 300, two thirds are a's.
    assert _share(a + b, 300, lambda p: p[1] == "a") == pytest.approx(2 / 3, abs=0.01)


async def test_many_job_ids_share_their_tenant_weight_not_multiply_it():
    s = _scheduler(a={"weight": 1.0}, b={"weight": 1.0})
    merged = []
    for _ in range(25):  # requests keep arriving: tenant a's spread over four jobs, b's in one
        for job in ("j1", "j2", "j3", "j4"):
            merged += (await _priorities(s, "a", job, 4))[1]
        merged += (await _priorities(s, "b", "only", 16))[1]
    share_b = _share(merged, 400, lambda p: p[1] == "b")
    assert share_b == pytest.approx(0.5, abs=0.05), share_b


async def test_a_tenant_arriving_beside_a_flood_is_served_next():
    s = _scheduler(max_inflight=2000)
    _, flood = await _priorities(s, "flood", "j", 1000)
    _, small = await _priorities(s, "small", "j", 3)
    flood_left = [p for p in flood if p[0] >= 10 * PRIORITY_SCALE]  # the flood's not yet served
    # The newcomer joins at the virtual time now, not behind the flood's 1000 requests.
    assert max(p[0] for p in small) < min(p[0] for p in flood_left)


async def test_http_over_a_tenant_max_inflight_gets_429_naming_it_and_a_queued_message_waits():
    s = _scheduler(c={"max_inflight": 4})
    async with s.admit("c", "j", 4, wait=False):
        with pytest.raises(AdmissionRefused) as err:
            async with s.admit("c", "j", 1, wait=False):
                pass
        assert err.value.status == 429 and "max_inflight of 4" in err.value.message
        assert err.value.retry_after
        async with s.admit("other", "j", 100, wait=False):  # other tenants are not held back
            pass
        queued = asyncio.ensure_future(_enter_and_leave(s, "c", 2))
        await asyncio.sleep(0.05)
        assert not queued.done()  # waits for its tenant's room
    await asyncio.wait_for(queued, 1)
    assert s.inflight == 0 and s.status()["waiting"] == 0
    with pytest.raises(AdmissionRefused) as err:  # larger than the tenant's whole limit
        async with s.admit("c", "j", 5, wait=True):
            pass
    assert err.value.status == 413


async def _enter_and_leave(s, tenant, n, wait=True):
    async with s.admit(tenant, "j", n, wait=wait):
        await asyncio.sleep(0)


async def test_past_capacity_requests_wait_in_tag_order_and_http_is_refused_when_the_room_is_full():
    s = _scheduler(max_inflight=2, max_waiting=2, a={"weight": 2.0}, b={"weight": 1.0})
    order = []

    async def one(tenant):
        async with s.admit(tenant, "j", 1, wait=True):
            order.append(tenant)
            await asyncio.sleep(0.01)

    async with s.admit("x", "j", 2, wait=False):  # capacity full
        tasks = [asyncio.ensure_future(one(t)) for t in ["b"] * 6 + ["a"] * 6]  # b first
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(_enter_and_leave(s, "http", 2, wait=False))
        await asyncio.sleep(0.01)
        with pytest.raises(AdmissionRefused) as err:  # the HTTP waiting room (2) is taken
            async with s.admit("http2", "j", 1, wait=False):
                pass
        assert err.value.code == "overloaded" and "limits.max_waiting_engine_requests" in err.value.message
    await asyncio.gather(*tasks, waiting)
    # Weighted: a (weight 2) gets two turns for b's one, though all of b's arrived first.
    assert order[:6].count("a") == 4, order


async def test_a_cancelled_waiter_gives_its_place_back():
    s = _scheduler(max_inflight=1, max_waiting=10)
    async with s.admit("a", "j", 1, wait=False):
        waiter = asyncio.ensure_future(_enter_and_leave(s, "b", 1, wait=False))
        await asyncio.sleep(0.01)
        assert s.waiting_cost == 1
        waiter.cancel()
        await asyncio.sleep(0)
        assert s.waiting_cost == 0 and s.status()["waiting"] == 0
    assert s.inflight == 0


async def test_tokens_per_minute_refuses_http_with_retry_after():
    s = _scheduler(c={"tokens_per_minute": 100})
    async with s.admit("c", "j", 1, wait=False):
        pass
    s.record_tokens("c", 150)
    with pytest.raises(AdmissionRefused) as err:
        async with s.admit("c", "j", 1, wait=False):
            pass
    assert err.value.status == 429 and "tokens_per_minute" in err.value.message
    assert 1 <= err.value.retry_after <= 60
    async with s.admit("d", "j", 1, wait=False):  # another tenant is unaffected
        pass


async def test_tenants_get_their_own_prefix_cache_salt_only_when_isolated():
    from reward_server.judges import RequestContext

    isolated = FairScheduler(10, 10, isolate_cache=True)
    async with isolated.admit("team-a", "j", 1, wait=False) as ticket:
        ctx = RequestContext(ticket=ticket)
        args = ctx.engine_args()
        assert args["cache_salt"] == "team-a" and isinstance(args["priority"], int)
    shared = FairScheduler(10, 10)
    async with shared.admit("anonymous", "j", 1, wait=False) as ticket:
        assert "cache_salt" not in RequestContext(ticket=ticket).engine_args()


async def test_refused_attempts_do_not_build_up_a_debt_for_their_flow():
    s = _scheduler(max_inflight=2, max_waiting=0)
    async with s.admit("x", "j", 1, wait=False):  # keeps the scheduler busy (no idle reset)
        async with s.admit("y", "j", 1, wait=False):
            for _ in range(50):  # a client retrying while the judge is full: refused every time
                with pytest.raises(AdmissionRefused):
                    async with s.admit("h", "j", 1, wait=False):
                        pass
        async with s.admit("h", "j", 1, wait=False) as ticket:
            assert ticket.start < 2  # not 50 requests behind


async def test_waiting_is_bounded_by_max_wait_and_by_part_of_the_deadline():
    import time

    from reward_server.fairness import DEADLINE, WAIT_FRACTION

    async def ask(tenant: str, wait: bool) -> None:
        async with s.admit(tenant, "j", 1, wait=wait):
            pass

    async def waiting(task: asyncio.Task) -> BaseException | None:
        """Once ``task`` waits in the queue (not refused at once): how its wait ended, while the
        only place stays taken (the time limit is a guard against waiting forever)."""
        while s.status()["waiting"] == 0 and not task.done():
            await asyncio.sleep(0)
        assert s.status()["waiting"] == 1, "refused at once instead of waiting"
        done, _ = await asyncio.wait({task}, timeout=30)
        assert done, "still waiting: the wait has no bound"
        return task.exception()

    s = FairScheduler(1, 10, max_wait_s=0.2)
    async with s.admit("a", "j", 1, wait=False):  # holds the only place throughout
        refused = await waiting(asyncio.create_task(ask("b", wait=False)))
        assert isinstance(refused, AdmissionRefused)  # HTTP: 429 after max_wait_s
        assert refused.status == 429 and "waited 0.2s" in refused.message
        token = DEADLINE.set(time.monotonic() + 0.4)  # a queued message with 0.4 s left...
        try:
            assert 0 < s._wait_budget(wait=True) <= 0.4 * WAIT_FRACTION  # ...waits half of it at most
            gave_up = await waiting(asyncio.create_task(ask("c", wait=True)))
        finally:
            DEADLINE.reset(token)
        assert isinstance(gave_up, asyncio.TimeoutError)  # and is answered expired, unjudged
        assert s.status()["waiting"] == 0 and s.waiting_cost == 0


# ------------------------------------------------------------ the tokeniser thread's order


def test_the_tokeniser_worker_runs_the_lowest_priority_first_and_skips_cancelled_work():
    import threading

    from reward_server.engine import PriorityWorker

    worker = PriorityWorker("test-tokenize")
    gate, ran = threading.Event(), []
    blocker = worker.submit(0, gate.wait)  # holds the thread while the rest queue up
    futures = {p: worker.submit(p, lambda p=p: ran.append(p) or p) for p in (5.0, 3.0, 4.0, 1.0)}
    first = worker.submit(2.0, lambda: ran.append("first 2.0"))  # equal priorities: submission order
    second = worker.submit(2.0, lambda: ran.append("second 2.0"))
    dropped = worker.submit(0.5, lambda: ran.append("cancelled"))
    assert dropped.cancel()
    failing = worker.submit(6.0, lambda: 1 / 0)
    gate.set()
    assert blocker.result(timeout=5) is True
    assert futures[5.0].result(timeout=5) == 5.0
    with pytest.raises(ZeroDivisionError):  # an exception reaches the request that submitted it
        failing.result(timeout=5)
    assert ran == [1.0, "first 2.0", "second 2.0", 3.0, 4.0, 5.0]
    assert first.done() and second.done() and dropped.cancelled()

    gate.clear()
    worker.submit(0, gate.wait)
    waiting = worker.submit(1, lambda: ran.append("after shutdown"))
    worker.shutdown()
    gate.set()
    assert waiting.cancelled() and worker.submit(0, lambda: None).cancelled()
    worker._thread.join(timeout=5)
    assert not worker._thread.is_alive() and "after shutdown" not in ran


# ------------------------------------------------------------ no tenant holds everything


async def _held(s, tenant, cost, job="j"):
    """Enter an admission of ``cost`` and keep it held (the caller leaves it with ``__aexit__``)."""
    cm = s.admit(tenant, job, cost, wait=False)
    return cm, await cm.__aenter__()


async def _settle(task, turns=20):
    """Let the loop run a few turns without anything being released (no timing)."""
    for _ in range(turns):
        if task.done():
            return
        await asyncio.sleep(0)


async def test_a_tenant_without_limits_holds_at_most_its_share_and_another_is_admitted_at_once():
    # Two tenants, neither with a max_inflight: A's two large requests cannot take all the capacity.
    s = FairScheduler(100, 100, {"a": TenantPolicy(), "b": TenantPolicy()})
    held, _ = await _held(s, "a", 50)  # half the capacity: A's default share
    second = asyncio.ensure_future(_enter_and_leave(s, "a", 50, wait=False))
    await _settle(second)
    assert not second.done() and s.status()["waiting"] == 1  # waits for A's own room
    small = asyncio.ensure_future(_enter_and_leave(s, "b", 1, wait=False))
    await _settle(small)
    assert small.done() and small.exception() is None  # admitted while A's requests are held
    await held.__aexit__(None, None, None)
    await _settle(second)
    assert second.done() and second.exception() is None
    assert s.inflight == 0 and s.waiting_cost == 0


async def test_a_request_that_fits_is_admitted_while_a_large_one_waits_for_room():
    # A may hold everything (its own max_inflight): its second large request waits for capacity;
    # B's one-item request fits beside it and is admitted without anything being released.
    s = FairScheduler(100, 200, {"a": TenantPolicy(max_inflight=200), "b": TenantPolicy()})
    held, _ = await _held(s, "a", 60)
    large = asyncio.ensure_future(_enter_and_leave(s, "a", 60, wait=False))
    await _settle(large)
    assert not large.done()
    small = asyncio.ensure_future(_enter_and_leave(s, "b", 1, wait=False))
    await _settle(small)
    assert small.done() and small.exception() is None
    await held.__aexit__(None, None, None)
    await _settle(large)
    assert large.done() and large.exception() is None


async def _history(s, tenant, cost):
    """Run one request of ``cost`` to its end: the tenant's finish tag moves on by ``cost``."""
    async with s.admit(tenant, "j", cost, wait=False):
        pass


async def test_a_later_request_passes_a_large_waiting_one_only_within_its_fair_share():
    s = _scheduler(100, 1000, a={}, b={}, c={})
    held, _ = await _held(s, "a", 40)  # keeps the order going (no idle reset)
    await _history(s, "b", 45)  # b has been served more than a: its next tags come after a's
    large = asyncio.ensure_future(_enter_and_leave(s, "a", 70, wait=False))  # 40 + 70 > 100: waits
    await _settle(large)
    assert not large.done()
    passing = []
    for _ in range(6):  # b's requests, tagged after a's large one, fit beside it
        task = asyncio.ensure_future(_held(s, "b", 10))
        await _settle(task)
        if not task.done():
            passing.append(task)
            break
        passing.append(task)
    # b passes while it stays within its fair share (half of 100, a and b busy): five of 10, not six
    assert [t.done() for t in passing] == [True] * 5 + [False]
    assert s.status()["tenants"] == {"a": 40, "b": 50}
    own = asyncio.ensure_future(_enter_and_leave(s, "a", 1, wait=False))  # a's own keep their order
    await _settle(own)
    assert not own.done()
    for task in passing[:5]:
        cm, _ = task.result()
        await cm.__aexit__(None, None, None)
    await held.__aexit__(None, None, None)
    for task in (large, own, passing[5]):
        await _settle(task)
    assert large.done() and own.done() and passing[5].done()
    cm, _ = passing[5].result()
    await cm.__aexit__(None, None, None)
    assert s.inflight == 0 and s.status()["waiting"] == 0


async def test_a_large_waiting_request_is_passed_by_at_most_its_own_cost_then_goes_first():
    s = _scheduler(100, 1000, a={}, b={})
    held, _ = await _held(s, "a", 40)
    await _history(s, "b", 45)
    large = asyncio.ensure_future(_enter_and_leave(s, "a", 70, wait=False))
    await _settle(large)
    passed = 0
    while True:  # b's small requests, one at a time, each run to its end as soon as it is admitted
        task = asyncio.ensure_future(_held(s, "b", 10))
        await _settle(task)
        if not task.done():
            break
        cm, _ = task.result()
        await cm.__aexit__(None, None, None)
        passed += 10
    assert passed == 70  # the large request's own cost: then nothing more goes ahead of it
    assert not large.done() and s.status()["waiting"] == 2
    await held.__aexit__(None, None, None)  # room for the large one: admitted, then what fits
    assert s.status()["tenants"] == {"a": 70, "b": 10} and s.status()["waiting"] == 0
    await _settle(large)
    await _settle(task)
    cm, _ = task.result()
    await cm.__aexit__(None, None, None)
    assert s.inflight == 0


async def test_each_tenant_has_a_share_of_the_waiting_room():
    s = FairScheduler(10, 10, {"a": TenantPolicy(), "b": TenantPolicy(), "c": TenantPolicy()})
    held, _ = await _held(s, "a", 5)  # a's share of the capacity (half of 10)
    a_waiting = [asyncio.ensure_future(_enter_and_leave(s, "a", 1, wait=False)) for _ in range(5)]
    await _settle(a_waiting[-1])
    assert s.status()["tenants_waiting"] == {"a": 5}
    with pytest.raises(AdmissionRefused) as err:  # a's sixth waiting request: over its half of the room
        await _enter_and_leave(s, "a", 1, wait=False)
    assert err.value.status == 429 and err.value.code == "rate_limited"
    assert "limits.tenant_share" in err.value.message and "waiting room" in err.value.message
    b_held, _ = await _held(s, "b", 5)  # b is admitted at once beside a's flood
    b_waiting = [asyncio.ensure_future(_enter_and_leave(s, "b", 1, wait=False)) for _ in range(5)]
    await _settle(b_waiting[-1])
    assert not any(t.done() for t in b_waiting)  # waiting, not refused
    with pytest.raises(AdmissionRefused) as err:  # the room is full now: c is told the judge is busy
        await _enter_and_leave(s, "c", 1, wait=False)
    assert err.value.code == "overloaded"
    await held.__aexit__(None, None, None)
    await b_held.__aexit__(None, None, None)
    await asyncio.gather(*a_waiting, *b_waiting)
    assert s.inflight == 0 and s.waiting_cost == 0 and s.status()["tenants_waiting"] == {}


async def test_a_request_over_the_tenant_share_is_413_and_one_tenant_alone_has_no_share():
    s = FairScheduler(
        100, 100, {"a": TenantPolicy(), "b": TenantPolicy(), "big": TenantPolicy(max_inflight=100)}
    )
    with pytest.raises(AdmissionRefused) as err:
        await _enter_and_leave(s, "a", 51, wait=True)
    assert err.value.status == 413 and "share of 50" in err.value.message
    assert "limits.tenant_share" in err.value.message
    await _enter_and_leave(s, "big", 100, wait=False)  # its own max_inflight replaces the share
    await _enter_and_leave(s, "a", 50, wait=False)
    for alone in (FairScheduler(100, 100), FairScheduler(100, 100, {"only": TenantPolicy()})):
        assert alone.inflight_limit("only") is None
        await _enter_and_leave(alone, "only", 100, wait=False)  # nobody else to keep room for


async def test_a_queued_message_over_its_tenant_share_waits_for_its_own_room():
    s = FairScheduler(10, 0, {"a": TenantPolicy(), "b": TenantPolicy()})
    held, _ = await _held(s, "a", 5)
    queued = asyncio.ensure_future(_enter_and_leave(s, "a", 1, wait=True))
    await _settle(queued)
    assert not queued.done()  # waits (queued messages are not refused), though 5 are free
    await _enter_and_leave(s, "b", 5, wait=False)  # the other half is b's
    await held.__aexit__(None, None, None)
    await _settle(queued)
    assert queued.done() and queued.exception() is None
