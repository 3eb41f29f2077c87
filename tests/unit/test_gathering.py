"""GroupGatherer, pure logic: groups fill up and are judged once, per key, and never hang."""

from __future__ import annotations

import asyncio

import pytest

from reward_server.gathering import GroupGatherer, GroupIncomplete


def run(coro):
    return asyncio.run(coro)


def test_a_full_group_is_judged_once_and_each_caller_gets_its_own_result():
    calls = []

    async def judge(members):
        calls.append(list(members))
        return [f"result of {m}" for m in members]

    async def main():
        g = GroupGatherer()
        out = await asyncio.gather(*[g.submit("p", m, size=3, timeout_s=5, judge=judge) for m in "abc"])
        return out, g

    out, g = run(main())
    assert out == ["result of a", "result of b", "result of c"]
    assert calls == [["a", "b", "c"]] and g.judged == 1 and g.open_groups == 0


def test_keys_keep_groups_apart_and_a_full_prompt_starts_a_new_group():
    groups = []

    async def judge(members):
        groups.append(sorted(members))
        return members

    async def main():
        g = GroupGatherer()
        subs = [g.submit(("job-1", "p"), f"x{k}", size=2, timeout_s=5, judge=judge) for k in range(4)]
        subs += [g.submit(("job-2", "p"), f"y{k}", size=2, timeout_s=5, judge=judge) for k in range(2)]
        return await asyncio.gather(*subs)

    out = run(main())
    assert out == ["x0", "x1", "x2", "x3", "y0", "y1"]
    assert sorted(groups) == [["x0", "x1"], ["x2", "x3"], ["y0", "y1"]]


def test_an_incomplete_group_is_judged_or_refused_at_its_deadline():
    async def judge(members):
        return [len(members)] * len(members)

    async def main(policy, n):
        g = GroupGatherer()
        subs = [g.submit("p", k, size=4, timeout_s=0.2, judge=judge, incomplete=policy) for k in range(n)]
        return await asyncio.gather(*subs, return_exceptions=True), g

    judged, g = run(main("judge", 3))
    assert judged == [3, 3, 3] and g.incomplete == 1
    refused, _ = run(main("error", 3))
    assert all(isinstance(r, GroupIncomplete) and "3 of its 4" in str(r) for r in refused)
    lone, _ = run(main("judge", 1))  # nothing to compare a lone response with
    assert isinstance(lone[0], GroupIncomplete)


def test_a_failing_judge_fails_every_member_and_a_wrong_size_is_refused():
    async def judge(members):
        raise RuntimeError("engine gone")

    async def main():
        g = GroupGatherer()
        first = asyncio.ensure_future(g.submit("p", 1, size=2, timeout_s=5, judge=judge))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="group size 2"):
            await g.submit("p", 2, size=3, timeout_s=5, judge=judge)
        second = g.submit("p", 3, size=2, timeout_s=5, judge=judge)
        return await asyncio.gather(first, second, return_exceptions=True)

    out = run(main())
    assert all(isinstance(r, RuntimeError) and "engine gone" in str(r) for r in out)


def test_a_caller_that_goes_away_does_not_cancel_the_group():
    seen = []

    async def judge(members):
        await asyncio.sleep(0.05)
        seen.append(members)
        return members

    async def main():
        g = GroupGatherer()
        gone = asyncio.ensure_future(g.submit("p", "a", size=2, timeout_s=5, judge=judge))
        await asyncio.sleep(0)
        stays = asyncio.ensure_future(g.submit("p", "b", size=2, timeout_s=5, judge=judge))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await stays

    assert run(main()) == "b" and seen == [["a", "b"]]


# ---------------------------------------------------------------- bounds per tenant, and leaving


async def _turns(n=5):
    for _ in range(n):
        await asyncio.sleep(0)


def test_one_tenants_open_groups_are_bounded_and_another_tenant_still_gathers():
    from reward_server.gathering import GatherRefused, TenantBounds

    async def judge(members):
        return members

    async def main():
        g = GroupGatherer(max_open=100)
        bounds = TenantBounds(groups=3, nbytes=1000)
        flood = [
            asyncio.ensure_future(
                g.submit(
                    ("a", k), "x", size=2, timeout_s=60, judge=judge, tenant="a", nbytes=10, bounds=bounds
                )
            )
            for k in range(3)
        ]
        await _turns()
        assert g.usage("a") == (3, 30)
        with pytest.raises(GatherRefused) as err:  # a fourth open group of tenant a
            await g.submit(("a", 9), "x", size=2, timeout_s=60, judge=judge, tenant="a", bounds=bounds)
        assert err.value.code == "rate_limited" and "limits.tenant_share" in str(err.value)
        # a sample joining one of a's open groups is not a new group: taken
        joined = g.submit(
            ("a", 0), "y", size=2, timeout_s=60, judge=judge, tenant="a", nbytes=10, bounds=bounds
        )
        assert await joined == "y"
        # tenant b gathers as before, while a's other groups stay open
        b = [
            g.submit(("b", 0), m, size=2, timeout_s=60, judge=judge, tenant="b", bounds=bounds) for m in "pq"
        ]
        assert await asyncio.gather(*b) == ["p", "q"]
        assert g.usage("a") == (2, 20) and g.usage("b") == (0, 0)
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        return g

    g = run(main())
    assert g.open_groups == 0 and g.usage("a") == (0, 0)


def test_one_tenants_buffered_bytes_are_bounded_and_the_message_names_the_limit():
    from reward_server.gathering import GatherRefused, TenantBounds

    async def judge(members):
        return members

    async def main():
        g = GroupGatherer()
        bounds = TenantBounds(groups=100, nbytes=100)
        held = asyncio.ensure_future(
            g.submit("p", "x", size=3, timeout_s=60, judge=judge, tenant="a", nbytes=60, bounds=bounds)
        )
        await _turns()
        with pytest.raises(GatherRefused) as err:
            await g.submit("p", "y", size=3, timeout_s=60, judge=judge, tenant="a", nbytes=41, bounds=bounds)
        assert err.value.code == "rate_limited" and "limits.max_gathered_bytes (100)" in str(err.value)
        assert g.usage("a") == (1, 60)  # the refused sample left nothing behind
        other = asyncio.ensure_future(
            g.submit("q", "z", size=3, timeout_s=60, judge=judge, tenant="b", nbytes=99, bounds=bounds)
        )
        await _turns()
        assert g.usage("b") == (1, 99)
        held.cancel()
        other.cancel()
        await asyncio.gather(held, other, return_exceptions=True)
        return g

    g = run(main())
    assert g.usage("a") == (0, 0) and g.usage("b") == (0, 0) and g.open_groups == 0


def test_a_sample_whose_caller_goes_away_leaves_its_open_group():
    judged = []

    async def judge(members):
        judged.append(list(members))
        return members

    async def main():
        g = GroupGatherer()
        gone = asyncio.ensure_future(
            g.submit("p", "a", size=2, timeout_s=60, judge=judge, tenant="t", nbytes=5)
        )
        await _turns()
        assert g.usage("t") == (1, 5)
        gone.cancel()  # the client disconnected before the group was complete
        await asyncio.gather(gone, return_exceptions=True)
        assert g.open_groups == 0 and g.usage("t") == (0, 0) and g.withdrawn == 1
        # the group fills with the samples of callers still there, not with the one that left
        out = await asyncio.gather(*[g.submit("p", m, size=2, timeout_s=60, judge=judge) for m in "bc"])
        return out

    assert run(main()) == ["b", "c"] and judged == [["b", "c"]]


def test_a_sample_whose_deadline_passes_leaves_its_group_and_gets_an_error():
    import time

    from reward_server.fairness import DEADLINE

    async def judge(members):
        return members

    async def main():
        g = GroupGatherer()
        stays = asyncio.ensure_future(
            g.submit("p", "a", size=3, timeout_s=60, judge=judge, tenant="t", nbytes=5)
        )
        await _turns()
        token = DEADLINE.set(time.monotonic())  # this call's deadline: already passed
        try:
            with pytest.raises(GroupIncomplete, match="deadline"):
                await g.submit("p", "late", size=3, timeout_s=60, judge=judge, tenant="t", nbytes=7)
        finally:
            DEADLINE.reset(token)
        assert g.usage("t") == (1, 5) and g.withdrawn == 1  # the late one is gone, the group stays
        rest = [g.submit("p", m, size=3, timeout_s=60, judge=judge) for m in "bc"]
        return await asyncio.gather(stays, *rest), g

    out, g = run(main())
    assert out == ["a", "b", "c"] and g.open_groups == 0
