"""Where the judge-health tallies (``referee.health``) are kept: per tenant, job, window and judge.

Every answered native request adds its tally (``JudgeService.record``). Without Redis the tallies
live in this process, for at most ``health.max_jobs`` jobs (least recently answered go first) and
``health.windows`` windows each. With the queue on they go to Redis every ``flush_every_s``, added
with ``HINCRBYFLOAT`` into one hash per job (``Keys.health``), so every replica's answers, HTTP and
queued, land in one report that any replica, the SDK and a queue-only trainer can read; the hash
expires ``windows * window_s`` after its job's last answer. Tenants may read their own hashes and
not write them: a job's report is the servers' count, never its own.

Prometheus gets the same counts by judge and tenant (tenants are configured, so the labels stay
bounded): ``referee_judge_comparisons_total`` and ``referee_judge_groups_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from prometheus_client import Counter

from referee.health import Tally, build_report, field, parse_fields, section_key, window_start
from referee.keys import Keys

from .settings import HealthSettings

logger = logging.getLogger(__name__)

COMPARISONS = Counter(
    "referee_judge_comparisons_total",
    "Pairwise comparisons answered, by judge, tenant and what they were: decided, tie, invalid, "
    "flipped (order=both: the verdict changed with the order; also counted as what the rule made it).",
    ["judge", "tenant", "outcome"],
)
FLUSH_ERRORS = Counter(
    "referee_judge_health_flush_errors_total",
    "Times this replica could not add its judge-health tallies to Redis (kept for the next try).",
)
GROUPS = Counter(
    "referee_judge_groups_total",
    "Groups of rewards (win-rate groups; scores per prompt), by judge, tenant and spread: flat (all "
    "equal: zero advantage), tiny (win rates within 0.05 std), spread.",
    ["judge", "tenant", "spread"],
)


def _count_metrics(judge: str, tenant: str, t: Tally) -> None:
    decided = t["pairs"] - t["pairs_tie"] - t["pairs_invalid"]
    for outcome, n in (
        ("decided", decided),
        ("tie", t["pairs_tie"]),
        ("invalid", t["pairs_invalid"]),
        ("flipped", t["pairs_flipped"]),
    ):
        if n:
            COMPARISONS.labels(judge, tenant, outcome).inc(n)
    spread = t["groups"] - t["groups_flat"] - t["groups_tiny"]
    for kind, n in (("flat", t["groups_flat"]), ("tiny", t["groups_tiny"]), ("spread", spread)):
        if n:
            GROUPS.labels(judge, tenant, kind).inc(n)


def health_limits(service) -> dict:
    """What ``QueueReferee.report`` reads from the queue's limits hash to read the jobs' hashes."""
    h = getattr(getattr(service, "settings", None), "health", None) or HealthSettings()
    return {"health_window_s": h.window_s, "health_windows": h.windows}


class HealthStore:
    """The tallies of every (tenant, job): in this process, and in Redis when given one."""

    def __init__(self, settings: HealthSettings, redis=None, prefix: str = "referee") -> None:
        self.settings = settings
        self.redis = redis
        self.prefix = prefix
        # (tenant, job) -> window start -> judge -> tally; without Redis, the whole store
        self._book: OrderedDict[tuple[str, str], dict[int, dict[str, Tally]]] = OrderedDict()
        self._pending: dict[tuple[str, str], dict[int, dict[str, Tally]]] = {}  # not yet in Redis
        self._flushing: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.flush_errors = 0

    @property
    def ttl_s(self) -> int:
        return int(self.settings.windows * self.settings.window_s) + 60

    def add(
        self, tenant: str, job: str, judge: str, route: str, tally: Tally | None, now: float | None = None
    ) -> None:
        """Count one answer of ``judge`` on ``route`` (its section of the report: win rates, scores
        and verdicts are not mixed)."""
        if not self.settings.enabled or not tally:
            return
        _count_metrics(judge, tenant, tally)
        judge = section_key(judge, route)
        start = window_start(time.time() if now is None else now, self.settings.window_s)
        target = self._pending if self.redis is not None else self._book
        key = (tenant, job)
        windows = target.setdefault(key, {})
        windows.setdefault(start, {}).setdefault(judge, Tally()).update(tally)
        if self.redis is None:
            self._book.move_to_end(key)
            oldest = start - (self.settings.windows - 1) * self.settings.window_s
            for s in [s for s in windows if s < oldest]:
                del windows[s]
            while len(self._book) > self.settings.max_jobs:
                self._book.popitem(last=False)
        elif self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.settings.flush_every_s)
        await self.flush()

    async def flush(self) -> None:
        """Add the pending tallies to Redis (one pipeline). On failure they are kept for the next
        flush, so a Redis restart loses nothing this process counted."""
        if self.redis is None:
            return
        async with self._lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    now = time.time()
                    for (tenant, job), windows in pending.items():
                        keys = Keys(self.prefix, tenant)
                        name = keys.health(job)
                        for start, judges in windows.items():
                            for judge, tally in judges.items():
                                for stat, value in tally.items():
                                    if value:
                                        pipe.hincrbyfloat(name, field(judge, stat, start), value)
                        pipe.expire(name, self.ttl_s)
                        pipe.zadd(keys.health_jobs, {job: now})
                        pipe.zremrangebyrank(keys.health_jobs, 0, -self.settings.max_jobs - 1)
                        pipe.expire(keys.health_jobs, self.ttl_s)
                    await pipe.execute()
            except Exception as exc:  # Redis away: keep the counts for the next flush
                self.flush_errors += 1
                FLUSH_ERRORS.inc()
                logger.warning("judge-health tallies not written to Redis (kept for the next try): %s", exc)
                for key, windows in list(pending.items())[-self.settings.max_jobs :]:  # bounded
                    mine = self._pending.setdefault(key, {})
                    for start, judges in windows.items():
                        for judge, tally in judges.items():
                            mine.setdefault(start, {}).setdefault(judge, Tally()).update(tally)
                if self._flushing is None or self._flushing.done():
                    self._flushing = asyncio.get_running_loop().create_task(self._flush_later())

    async def close(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flushing
        with contextlib.suppress(Exception):
            await self.flush()

    # ------------------------------------------------------------ reading

    async def jobs(self, tenant: str) -> list[str]:
        """The tenant's jobs with figures, most recent first."""
        if self.redis is None:
            return [job for (t, job) in reversed(self._book) if t == tenant]
        await self.flush()
        listed = await self.redis.zrevrange(
            Keys(self.prefix, tenant).health_jobs, 0, self.settings.max_jobs - 1
        )
        return [j.decode() if isinstance(j, bytes) else j for j in listed]

    async def windows(self, tenant: str, job: str) -> dict[int, dict[str, Tally]]:
        if self.redis is None:
            return self._book.get((tenant, job), {})
        await self.flush()
        return parse_fields(await self.redis.hgetall(Keys(self.prefix, tenant).health(job)))

    async def report(self, tenant: str, job: str | None = None, judge: str | None = None):
        """One job's report, or (``job`` None) all the tenant's recent jobs' together; ``judge``
        keeps one judge's section."""
        if job is not None:
            merged = await self.windows(tenant, job)
        else:
            merged: dict[int, dict[str, Tally]] = {}
            for name in await self.jobs(tenant):
                for start, judges in (await self.windows(tenant, name)).items():
                    for j, tally in judges.items():
                        merged.setdefault(start, {}).setdefault(j, Tally()).update(tally)
        if judge is not None:
            merged = {
                s: {k: t for k, t in ts.items() if k.split("/")[0] == judge} for s, ts in merged.items()
            }
        return build_report(
            merged,
            tenant=tenant,
            job=job,
            window_s=self.settings.window_s,
            keep=self.settings.windows,
        )
