"""The judgment cache's logic: identical requests in flight run once, errors are not kept, a
cancelled leader hands over, old entries go. Through the real servers: ``tests/serving/test_cache.py``."""

from __future__ import annotations

import asyncio

import pytest

from reward_server.cache import JudgmentCache, cache_key


def test_identical_requests_in_flight_run_once_and_errors_are_not_kept():
    calls = []

    async def main():
        cache = JudgmentCache()

        async def run():
            calls.append(1)
            await asyncio.sleep(0.05)
            return 0.25

        out = await asyncio.gather(*[cache.get_or_run("j", "t", "k", run) for _ in range(5)])
        assert [v for v, _ in out] == [0.25] * 5 and sum(hit for _, hit in out) == 4

        async def fail():
            calls.append("fail")
            raise RuntimeError("engine")

        for _ in range(2):
            with pytest.raises(RuntimeError):
                await cache.get_or_run("j", "t", "bad", fail)
        assert (await cache.get_or_run("j", "other-tenant", "k", run))[1] is False  # scoped

    asyncio.run(main())
    assert calls == [1, "fail", "fail", 1]


def test_a_cancelled_leader_hands_over_and_old_entries_go():
    async def main():
        cache = JudgmentCache(max_entries=2, ttl_s=60)
        started = asyncio.Event()

        async def slow():
            started.set()
            await asyncio.sleep(10)

        leader = asyncio.ensure_future(cache.get_or_run("j", "t", "k", slow))
        await started.wait()

        async def quick():
            return "mine"

        follower = asyncio.ensure_future(cache.get_or_run("j", "t", "k", quick))
        await asyncio.sleep(0)
        leader.cancel()
        assert await follower == ("mine", False)
        for key in ("a", "b", "c"):
            await cache.get_or_run("j", "t", key, quick)
        assert (await cache.get_or_run("j", "t", "a", quick))[1] is False  # evicted (LRU of 2)

    asyncio.run(main())
    assert cache_key("complete", [1, 2]) != cache_key("complete", [2, 1])
