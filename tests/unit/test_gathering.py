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
