"""Judge health on a real server: the embedded judge's position preference shows in the report, over
HTTP and through the queue (one count in Redis for both), per tenant, and tenants cannot forge it."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
import redis as redis_sync
from redis.exceptions import NoPermissionError

from referee import AsyncReferee, QueueReferee
from referee.health import HealthReport
from referee.keys import Keys
from tests.support import REDIS_URL

QUESTION = "What is the capital of France?"
GROUP = ["The capital of France is Paris.", "I like turtles.", "Paris.", "London is the capital of France."]


def _job() -> str:
    return f"health-{uuid.uuid4().hex[:8]}"


async def _settled(read, comparisons: int) -> HealthReport:
    """The report once it counts ``comparisons`` (servers add their tallies to Redis every
    flush_every_s): polled, never timed."""
    for _ in range(200):
        report = await read()
        if report.judges and report.judges[0].totals.comparisons >= comparisons:
            return report
        await asyncio.sleep(0.1)
    pytest.fail(f"the report never counted {comparisons} comparisons: {report}")


async def test_the_embedded_judges_position_preference_is_reported_over_http_and_the_queue(
    server_url, redis_prefix
):
    http_job, queue_job = _job(), _job()
    async with (
        AsyncReferee(server_url, job_id=http_job) as ref,
        QueueReferee(REDIS_URL, job_id=queue_job, prefix=redis_prefix, timeout=300) as q,
    ):
        for k in range(3):
            await ref.winrate(prompt=f"{QUESTION} ({k})", responses=GROUP, order="both")
            await q.winrate(prompt=f"{QUESTION} ({k})", responses=GROUP, order="both")
        over_http = await _settled(ref.report, 18)
        (section,) = over_http.judges
        t = section.totals
        assert (section.judge, section.route, over_http.job) == ("smollm2", "winrate", http_job)
        assert t.comparisons == t.both_order_comparisons == 18 and t.groups == 3
        # the 135M judge prefers a position: its verdicts flip with the order, and the report says so
        assert t.order_flip_rate >= 0.3
        assert any("flip with the order" in w for w in section.warnings), section.warnings
        assert all(w.startswith("smollm2 /winrate: ") for w in over_http.warnings)
        # the queued job's answers, read from Redis by the queue client and over HTTP, are one count
        from_redis = await _settled(q.report, 18)
        asked = httpx.get(f"{server_url}/report", params={"job": queue_job}, timeout=30).json()
        assert from_redis.judges[0].totals == HealthReport.model_validate(asked).judges[0].totals
        assert from_redis.judges[0].totals.comparisons == 18
        # every recent job of the tenant together
        together = await ref.report(all_jobs=True)  # other tests' jobs are in it too
        winrates = next(s for s in together.judges if (s.judge, s.route) == ("smollm2", "winrate"))
        assert together.job is None and winrates.totals.comparisons >= 36


def test_report_requests_are_checked(server_url):
    bad_job = httpx.get(f"{server_url}/report", params={"job": "a:b"}, timeout=30)
    assert bad_job.status_code == 422 and "job" in bad_job.json()["message"]
    no_judge = httpx.get(f"{server_url}/report", params={"job": "x", "judge": "nope"}, timeout=30)
    assert no_judge.status_code == 404 and "smollm2" in no_judge.json()["message"]
    nothing = httpx.get(f"{server_url}/report", params={"job": _job()}, timeout=30)
    assert nothing.status_code == 200 and nothing.json()["judges"] == []


async def test_a_tenant_reads_its_own_reports_only_and_cannot_write_them(tenant_server):
    ts = tenant_server
    job = _job()
    items = [
        {"prompt": f"Q{k}", "response": r} for k in range(2) for r in ("Yes.", "No, never.", "Maybe so.")
    ]
    scored = httpx.post(
        f"{ts.url}/score", json={"items": items}, headers=ts.headers("team-a", job), timeout=120
    )
    assert scored.status_code == 200

    def report(as_tenant: str, **params) -> httpx.Response:
        return httpx.get(
            f"{ts.url}/report", params={"job": job, **params}, headers=ts.headers(as_tenant), timeout=30
        )

    own = HealthReport.model_validate(report("team-a").json())
    assert [(s.judge, s.route) for s in own.judges] == [("tiny-rm", "score")]
    assert own.judges[0].totals.groups == 2 and own.judges[0].totals.rewards == 6
    assert report("team-b").json()["judges"] == []  # the same job name in another tenant: not this one
    refused = report("team-b", tenant="team-a")
    assert refused.status_code == 403 and "operators" in refused.json()["message"]
    assert report("team-d", tenant="team-a").json()["judges"] == own.model_dump(mode="json")["judges"]
    # The queue client reads the same report with the tenant's own Redis user, which may not write it.
    async with QueueReferee(ts.redis_url, job_id=job, prefix=ts.prefix, api_key=ts.keys["team-a"]) as q:
        from_redis = await _settled(q.report, 0)
        assert from_redis.judges[0].totals.rewards == 6
    as_a = redis_sync.Redis.from_url(ts.redis_url, username="team-a", password=ts.keys["team-a"])
    try:
        with pytest.raises(NoPermissionError):
            as_a.hincrbyfloat(Keys(ts.prefix, "team-a").health(job), "0|tiny-rm/score|groups_flat", 100)
    finally:
        as_a.close()
