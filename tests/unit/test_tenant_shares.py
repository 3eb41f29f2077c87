"""No tenant can take the shared judge down: the default shares through the real service (a scripted
engine instead of vLLM), gathered samples checked and bounded per tenant before they wait, and
idempotency keys bounded per tenant. The scheduler's own rules are in test_fairness.py, the
gatherer's in test_gathering.py; orders and counts only, no timing."""

from __future__ import annotations

import asyncio

import pytest

from referee.auth import hash_key, new_key
from referee.protocol import Message, ScoreItem, ScoreRequest
from reward_server.errors import ClientError
from reward_server.fairness import DEFAULT_TENANT_SHARE
from reward_server.gathering import GroupGatherer
from reward_server.idempotency import IdempotencyCache
from reward_server.service import JudgeService
from reward_server.settings import Limits, ServerSettings, TenantSettings
from reward_server.slime_api import GroupOptions, gathered_win_rate
from reward_server.tenancy import Caller
from tests.support import RESPONSES, ScriptedEngine

A, B = Caller("team-a", "j"), Caller("team-b", "j")


class TenantEngine(ScriptedEngine):
    """The scripted engine, taking the prefix-cache salt that tenants' engine requests carry."""

    async def classify(self, token_ids, *, cache_salt=None, **kwargs) -> float:
        return await super().classify(token_ids, **kwargs)


def _tenants(*names: str) -> list[TenantSettings]:
    return [TenantSettings(name=n, keys=[hash_key(new_key(n))]) for n in names]


@pytest.fixture()
def make_service(tiny_classifier_dir):
    from transformers import AutoTokenizer

    from reward_server.judges import ClassifierJudge, parse_judge_settings

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)

    def make(limits: dict | None = None, tenants=("team-a", "team-b")) -> JudgeService:
        settings = parse_judge_settings(
            {"name": "rm", "kind": "classifier", "model": str(tiny_classifier_dir)}
        )
        service = JudgeService(
            ServerSettings(
                judges=[settings],
                limits=limits or {},
                tenants=_tenants(*tenants),
                cache={"enabled": False},
            )
        )
        engine = TenantEngine(tokenizer, "pooling")
        engine.logits.update({"alpha": 2.0, "bravo": 1.0, "charlie": 0.5, "delta": -1.0})
        service.judges = {"rm": ClassifierJudge(settings, engine)}
        return service

    return make


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# ---------------------------------------------------------------- engine capacity


def test_the_default_share_is_half_and_the_same_in_settings_and_scheduler():
    assert Limits().tenant_share == DEFAULT_TENANT_SHARE == 0.5


async def test_with_several_tenants_a_request_over_a_tenants_share_is_413_naming_it(make_service):
    limits = {"max_inflight_engine_requests": 8, "max_request_cost": 8}
    service = make_service(limits)
    five = ScoreRequest(judge="rm", items=[ScoreItem(prompt="Q?", response=RESPONSES[0])] * 5)
    with pytest.raises(ClientError) as refused:
        await service.score(five, **A.who())
    assert refused.value.status == 413 and "limits.tenant_share" in refused.value.message
    four = five.model_copy(update={"items": five.items[:4]})
    assert [r.score for r in (await service.score(four, **A.who())).results] == [2.0] * 4
    # one tenant alone has nobody to keep room for: the whole capacity is its own
    alone = make_service(limits, tenants=("team-a",))
    assert [r.score for r in (await alone.score(five, **A.who())).results] == [2.0] * 5


# ---------------------------------------------------------------- gathered samples


def _options(size: int = 2) -> GroupOptions:
    return GroupOptions(group_size=size, group_timeout_s=600)


async def test_a_gathered_sample_is_checked_before_it_waits(make_service):
    service = make_service({"max_text_chars": 100, "max_messages": 2})
    gather = GroupGatherer()
    cases = [
        ("Q?", "x" * 101, "limits.max_text_chars"),
        ([Message(role="user", content="y" * 101)], RESPONSES[0], "limits.max_text_chars"),
        ([Message(role="user", content="hi")] * 3, RESPONSES[0], "limits.max_messages"),
    ]
    for prompt, response, limit in cases:
        with pytest.raises(ClientError) as refused:
            await gathered_win_rate(service, gather, A, "rm", prompt, response, _options())
        assert refused.value.status == 413 and limit in refused.value.message
    with pytest.raises(ClientError) as refused:  # an unknown judge: now, not once the group is full
        await gathered_win_rate(service, gather, A, "nope", "Q?", RESPONSES[0], _options())
    assert refused.value.status == 404
    assert gather.open_groups == 0 and gather.usage(A.tenant) == (0, 0)  # nothing was kept


async def test_one_tenants_open_groups_get_429_while_another_tenant_is_answered(make_service):
    service = make_service()  # tenant_share 0.5
    gather = GroupGatherer(max_open=4)  # two open groups per tenant
    flood = [
        asyncio.ensure_future(gathered_win_rate(service, gather, A, "rm", f"Q{k}?", RESPONSES[0], _options()))
        for k in range(2)
    ]
    await _turns()
    assert gather.usage(A.tenant)[0] == 2
    with pytest.raises(ClientError) as refused:
        await gathered_win_rate(service, gather, A, "rm", "Q9?", RESPONSES[0], _options())
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert "limits.tenant_share" in refused.value.message and refused.value.headers["Retry-After"]
    rates = await asyncio.gather(
        *[gathered_win_rate(service, gather, B, "rm", "Q?", r, _options()) for r in RESPONSES[:2]]
    )
    assert rates[0] > rates[1]  # alpha's logit is above bravo's
    for task in flood:  # a's callers go away: their samples leave with them
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    assert gather.open_groups == 0 and gather.usage(A.tenant) == (0, 0) and gather.withdrawn == 2


async def test_one_tenants_buffered_bytes_get_429_naming_max_gathered_bytes(make_service):
    service = make_service({"max_gathered_bytes": 1024})
    gather = GroupGatherer()
    long = RESPONSES[0] + " " + "w" * 600
    first = asyncio.ensure_future(gathered_win_rate(service, gather, A, "rm", "Q?", long, _options(3)))
    await _turns()
    with pytest.raises(ClientError) as refused:  # the second would pass a's 1024 bytes
        await gathered_win_rate(service, gather, A, "rm", "Q?", long, _options(3))
    assert refused.value.status == 429 and "limits.max_gathered_bytes (1024)" in refused.value.message
    second = asyncio.ensure_future(gathered_win_rate(service, gather, B, "rm", "Q?", long, _options(3)))
    await _turns()
    assert not second.done()  # b's sample waits for its group: b has its own bound
    for task in (first, second):
        task.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert gather.usage(A.tenant) == (0, 0) and gather.usage(B.tenant) == (0, 0)


# ---------------------------------------------------------------- idempotency keys


async def test_one_tenants_idempotency_keys_do_not_evict_anothers():
    cache = IdempotencyCache(max_entries=3)
    judged: list[str] = []
    body = ScoreRequest(items=[ScoreItem(prompt="Q?", response="R.")])

    def judge(name: str):
        async def run():
            judged.append(name)
            return body

        return run

    await cache.run("team-b\0keep", "score", body, judge("b"))
    for k in range(10):  # team-a's many keys
        await cache.run(f"team-a\0k{k}", "score", body, judge(f"a{k}"))
    assert cache.entries("team-a") == 3 and cache.entries("team-b") == 1
    await cache.run("team-b\0keep", "score", body, judge("b again"))  # b's retry: answered, not judged
    assert judged.count("b") == 1 and "b again" not in judged
    await cache.run("team-a\0k0", "score", body, judge("a0 again"))  # a's own oldest went first
    assert "a0 again" in judged
