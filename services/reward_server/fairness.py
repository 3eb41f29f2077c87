"""Weighted fair sharing of the engines between tenants, then between a tenant's jobs.

Every judging request, from HTTP or from the queue, is admitted here with its worst-case cost in
engine requests, its tenant and its job. Two things follow from one virtual clock:

- **the engine order.** Each request gets a start tag by start-time fair queuing (Goyal, Vin and
  Cheng, "Start-time Fair Queueing", SIGCOMM 1996): ``start = max(V, finish[flow])`` and
  ``finish[flow] = start + cost / weight``, where a flow is one job of one tenant, weighted by its
  tenant's weight shared among the tenant's busy jobs (so eight job ids take one tenant's share, not
  eight), and V is the tag of the first unfinished engine request in flight. Its k-th engine
  request carries the vLLM priority ``start + k / weight``: with the engine's priority scheduling,
  busy tenants are served in proportion to their weights whatever they send, and an idle tenant
  that arrives is served at once (at V) instead of behind a flood.
- **the tokeniser order.** Before an engine sees a prompt, the engine's one tokeniser thread
  templates and tokenises it; its k-th prompt waits there at ``start + k / weight`` too, so another
  job's small request is not queued behind a large request's thousands of prompts.
- **admission.** At most ``max_inflight`` engine requests (``limits.max_inflight_engine_requests``)
  are in the engines. Past that, requests wait here in tag order (up to ``max_waiting`` engine
  requests of HTTP requests, ``limits.max_waiting_engine_requests``; past that an HTTP request gets
  429), an HTTP request for at most ``max_wait_s`` (``limits.max_admission_wait_s``) or half the
  time left to its deadline. A tenant over its own ``max_inflight`` or
  ``tokens_per_minute`` gets 429 naming that limit over HTTP; queued messages wait instead (the
  consumer holds them, and waiting costs them nothing).

With no tenants configured every request belongs to the open tenant, and the same rules share the
engines between its jobs.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from . import metrics

# The request's deadline (time.monotonic()), set by whoever received it: the HTTP edge from
# X-Request-Timeout, the queue consumer from the message's deadline.
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("referee_deadline", default=None)
# Of the time left to its deadline, the part a request may spend waiting for admission: the rest is
# kept for judging it. A request admitted with almost no time left would be cancelled part-way
# through at its deadline, its engine work wasted, and under overload that waste feeds on itself.
WAIT_FRACTION = 0.5
PRIORITY_SCALE = 1000  # vLLM priorities are integers: tags in thousandths of an engine request
TOKEN_WINDOW_S = 60.0


class AdmissionRefused(Exception):
    """A request the scheduler will not take now: ``status``, ``code``, ``message``, ``retry_after``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass(eq=False)
class Ticket:
    """One admitted request: its place in the fair order and the engine priorities it hands out."""

    tenant: str
    job: str
    cost: int
    start: float
    step: float  # 1 / the flow's weight: tag distance between its engine requests
    cache_salt: str | None = None
    issued: int = 0
    tokenized: int = 0  # prompts handed to the engines' tokeniser threads
    done: int = 0  # engine requests finished
    admitted: asyncio.Future | None = field(default=None, repr=False)
    seq: int = 0
    wait_counted: bool = False  # counted in waiting_cost (an HTTP request waiting)
    previous_finish: float | None = None  # its flow's finish tag before it was tagged

    def next_priority(self) -> int:
        """The vLLM priority of this request's next engine request (lower is served first)."""
        tag = self.start + self.issued * self.step
        self.issued += 1
        return int(tag * PRIORITY_SCALE)

    def next_tokenize_priority(self) -> float:
        """The place of this request's next prompt in an engine's tokeniser queue (lower first): the
        same fair order as its engine requests, so that a small request of another job is templated
        beside a large one's thousands of prompts, not behind them."""
        tag = self.start + self.tokenized * self.step
        self.tokenized += 1
        return tag

    @property
    def frontier(self) -> float:
        """The tag of its first unfinished engine request (about: they finish in any order)."""
        return self.start + min(self.done, self.cost) * self.step


@dataclass
class TenantPolicy:
    weight: float = 1.0
    max_inflight: int | None = None
    tokens_per_minute: int | None = None


class FairScheduler:
    def __init__(
        self,
        max_inflight: int,
        max_waiting: int,
        policies: dict[str, TenantPolicy] | None = None,
        *,
        isolate_cache: bool = False,
        max_wait_s: float | None = None,
    ) -> None:
        self.max_inflight = max_inflight
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self.policies = policies or {}
        self.isolate_cache = isolate_cache
        self.inflight = 0  # engine requests admitted, all tenants
        self.waiting_cost = 0  # engine requests of HTTP requests waiting for admission
        self._tenant_inflight: dict[str, int] = {}
        self._running: set[Ticket] = set()
        self._waiters: list[Ticket] = []
        self._finish: dict[tuple[str, str], float] = {}  # flow -> finish tag of its last request
        self._busy_jobs: dict[str, dict[str, int]] = {}  # tenant -> job -> requests running or waiting
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._token_sums: dict[str, int] = {}
        self._seq = itertools.count()

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant) or TenantPolicy()

    # ------------------------------------------------------------ the virtual clock

    def _vtime(self) -> float:
        # Where the engines are in the fair order: the first unfinished engine request of any
        # request in flight (a batching engine serves many at once; SFQ's "start tag of the packet
        # in service" is this frontier). A tenant that arrives starts there, beside the work being
        # served, ahead of any backlog queued behind it.
        tags = [t.frontier for t in self._running] + [t.start for t in self._waiters]
        return min(tags) if tags else 0.0

    def now(self) -> float:
        """The current point of the fair order: where a request not yet admitted (an OpenAI-style
        prompt being tokenised before admission) takes its place in an engine's tokeniser queue."""
        return self._vtime()

    def _tag(self, tenant: str, job: str, cost: int) -> Ticket:
        jobs = self._busy_jobs.setdefault(tenant, {})
        jobs[job] = jobs.get(job, 0) + 1
        weight = self.policy(tenant).weight / len(jobs)
        flow = (tenant, job)
        previous = self._finish.get(flow)
        start = max(self._vtime(), previous or 0.0)
        step = 1.0 / weight
        self._finish[flow] = start + cost * step
        salt = tenant if self.isolate_cache else None
        return Ticket(tenant, job, cost, start, step, salt, seq=next(self._seq), previous_finish=previous)

    def _untag(self, ticket: Ticket) -> None:
        """A request refused or given up before it ran used none of its flow's share: unless a later
        request of the flow was tagged after it, its flow's finish tag goes back to what it was (a
        client retrying refused requests must not build up a debt that later starves it)."""
        flow = (ticket.tenant, ticket.job)
        if self._finish.get(flow) == ticket.start + ticket.cost * ticket.step:
            if ticket.previous_finish is None:
                self._finish.pop(flow, None)
            else:
                self._finish[flow] = ticket.previous_finish

    def _forget(self, ticket: Ticket) -> None:
        jobs = self._busy_jobs.get(ticket.tenant, {})
        jobs[ticket.job] = jobs.get(ticket.job, 1) - 1
        if jobs.get(ticket.job, 0) <= 0:
            jobs.pop(ticket.job, None)
        if not self._running and not self._waiters:
            # Idle: forget history, so tags stay small and a returning tenant owes nothing.
            self._finish.clear()

    # ------------------------------------------------------------ limits

    def _fits(self, ticket: Ticket) -> bool:
        limit = self.policy(ticket.tenant).max_inflight
        mine = self._tenant_inflight.get(ticket.tenant, 0)
        return self.inflight + ticket.cost <= self.max_inflight and (
            limit is None or mine + ticket.cost <= limit
        )

    def _tenant_full(self, ticket: Ticket) -> bool:
        limit = self.policy(ticket.tenant).max_inflight
        return limit is not None and self._tenant_inflight.get(ticket.tenant, 0) + ticket.cost > limit

    def _tokens_used(self, tenant: str, now: float) -> int:
        window = self._tokens.get(tenant)
        while window and now - window[0][0] >= TOKEN_WINDOW_S:
            self._token_sums[tenant] -= window.popleft()[1]
        return self._token_sums.get(tenant, 0)

    def _token_wait(self, tenant: str) -> float:
        """Seconds until the tenant is under its tokens_per_minute again (0: it is now)."""
        limit = self.policy(tenant).tokens_per_minute
        if limit is None:
            return 0.0
        now = time.monotonic()
        used = self._tokens_used(tenant, now)
        if used < limit:
            return 0.0
        window, excess = self._tokens[tenant], used - limit
        for stamp, tokens in window:  # the oldest entries must leave the window first
            excess -= tokens
            if excess < 0:
                return max(0.05, stamp + TOKEN_WINDOW_S - now)
        return TOKEN_WINDOW_S

    def record_tokens(self, tenant: str, tokens: int) -> None:
        if tokens <= 0:
            return
        self._tokens.setdefault(tenant, deque()).append((time.monotonic(), tokens))
        self._token_sums[tenant] = self._token_sums.get(tenant, 0) + tokens
        metrics.TENANT_TOKENS.labels(tenant).inc(tokens)

    # ------------------------------------------------------------ admission

    @asynccontextmanager
    async def admit(self, tenant: str, job: str, cost: int, *, wait: bool) -> AsyncIterator[Ticket]:
        """Hold ``cost`` engine requests of capacity for ``tenant``'s ``job`` while the body runs.

        ``wait``: a queued message waits for its tenant's limits; an HTTP request is refused with
        ``AdmissionRefused`` (429, naming the limit) instead. Both wait for the engines' capacity."""
        policy = self.policy(tenant)
        if policy.max_inflight is not None and cost > policy.max_inflight:
            raise AdmissionRefused(
                413,
                "too_large",
                f"this request needs {cost} engine requests, over tenant {tenant!r}'s max_inflight of "
                f"{policy.max_inflight}; split it",
            )
        while (delay := self._token_wait(tenant)) > 0:
            if not wait:
                metrics.TENANT_REFUSED.labels(tenant, "tokens_per_minute").inc()
                raise AdmissionRefused(
                    429,
                    "rate_limited",
                    f"tenant {tenant!r} used its tokens_per_minute ({policy.tokens_per_minute}); "
                    "retry after the delay in Retry-After",
                    delay,
                )
            await asyncio.sleep(min(delay, 1.0))
        ticket = self._tag(tenant, job, cost)
        try:
            await self._acquire(ticket, wait)
        except BaseException:
            if ticket not in self._running:  # refused, or cancelled while waiting: it used nothing
                self._untag(ticket)
            self._forget(ticket)
            self._dispatch()
            raise
        try:
            yield ticket
        finally:
            self._release(ticket)

    async def _acquire(self, ticket: Ticket, wait: bool) -> None:
        if not self._waiters and self._fits(ticket):
            self._start(ticket)
            return
        if not wait:
            if self._tenant_full(ticket):
                limit = self.policy(ticket.tenant).max_inflight
                metrics.TENANT_REFUSED.labels(ticket.tenant, "max_inflight").inc()
                raise AdmissionRefused(
                    429,
                    "rate_limited",
                    f"tenant {ticket.tenant!r} has {self._tenant_inflight.get(ticket.tenant, 0)} engine "
                    f"requests in flight, at its max_inflight of {limit}; retry after the delay in "
                    "Retry-After",
                    1.0,
                )
            if self.waiting_cost + ticket.cost > self.max_waiting:
                metrics.TENANT_REFUSED.labels(ticket.tenant, "max_waiting").inc()
                raise AdmissionRefused(
                    429,
                    "overloaded",
                    f"the judge has {self.inflight} engine requests in flight "
                    f"(limits.max_inflight_engine_requests {self.max_inflight}) and {self.waiting_cost} "
                    f"waiting (limits.max_waiting_engine_requests {self.max_waiting}); retry after the "
                    "delay in Retry-After",
                    1.0,
                )
        ticket.admitted = asyncio.get_running_loop().create_future()
        self._waiters.append(ticket)
        if not wait:
            self.waiting_cost += ticket.cost
        ticket.wait_counted = not wait
        metrics.ADMISSION_WAITING.set(len(self._waiters))
        budget = self._wait_budget(wait)
        try:
            await asyncio.wait_for(asyncio.shield(ticket.admitted), budget)
        except asyncio.TimeoutError:
            if ticket.admitted.done():  # admitted at the last moment: keep it
                return
            self._unwait(ticket)
            metrics.TENANT_REFUSED.labels(ticket.tenant, "deadline").inc()
            if wait:  # a queued message: answered `expired` by the consumer, unjudged
                raise
            raise AdmissionRefused(
                429,
                "overloaded",
                f"waited {budget:.1f}s for the engines (limits.max_admission_wait_s, or half the request's "
                f"deadline) with {self.inflight} engine requests in flight and {len(self._waiters)} "
                "requests waiting; retry after the delay in Retry-After",
                1.0,
            ) from None
        except BaseException:
            if ticket in self._waiters:
                self._unwait(ticket)
            elif ticket in self._running:  # admitted just as it was cancelled
                self._release(ticket, forget=False)
            raise

    def _wait_budget(self, wait: bool) -> float | None:
        """How long a request may wait for admission: a part of the time left to its deadline, and
        for HTTP requests at most ``max_wait_s``."""
        deadline = DEADLINE.get()
        budget = None if deadline is None else max(0.0, (deadline - time.monotonic()) * WAIT_FRACTION)
        if not wait and self.max_wait_s is not None:
            budget = self.max_wait_s if budget is None else min(budget, self.max_wait_s)
        return budget

    def _unwait(self, ticket: Ticket) -> None:
        self._waiters.remove(ticket)
        if ticket.wait_counted:
            self.waiting_cost -= ticket.cost
        metrics.ADMISSION_WAITING.set(len(self._waiters))

    def _start(self, ticket: Ticket) -> None:
        self._running.add(ticket)
        self.inflight += ticket.cost
        self._tenant_inflight[ticket.tenant] = self._tenant_inflight.get(ticket.tenant, 0) + ticket.cost
        metrics.INFLIGHT.set(self.inflight)
        metrics.TENANT_INFLIGHT.labels(ticket.tenant).set(self._tenant_inflight[ticket.tenant])

    def _release(self, ticket: Ticket, forget: bool = True) -> None:
        if ticket not in self._running:
            return
        self._running.discard(ticket)
        self.inflight -= ticket.cost
        self._tenant_inflight[ticket.tenant] -= ticket.cost
        metrics.INFLIGHT.set(self.inflight)
        metrics.TENANT_INFLIGHT.labels(ticket.tenant).set(self._tenant_inflight[ticket.tenant])
        if forget:
            self._forget(ticket)
        self._dispatch()

    def _dispatch(self) -> None:
        """Admit waiters in tag order while they fit; one held back by its tenant's limit does not
        hold back other tenants, one too large for the free capacity holds back everything after it
        (so large requests are not starved by small ones)."""
        for ticket in sorted(self._waiters, key=lambda t: (t.start, t.seq)):
            if self.inflight + ticket.cost > self.max_inflight:
                break
            if self._tenant_full(ticket):
                continue
            self._unwait(ticket)
            self._start(ticket)
            if ticket.admitted is not None and not ticket.admitted.done():
                ticket.admitted.set_result(None)

    def status(self) -> dict:
        return {
            "inflight": self.inflight,
            "waiting": len(self._waiters),
            "tenants": {t: n for t, n in self._tenant_inflight.items() if n},
        }


def retry_after(seconds: float | None) -> str:
    return str(max(1, math.ceil(seconds or 1)))
