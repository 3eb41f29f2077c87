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
- **shares.** With several tenants configured, a tenant without a ``max_inflight`` of its own holds
  at most ``tenant_share`` of the capacity (``limits.tenant_share``, default one half), and each
  tenant's HTTP requests take at most that share of the waiting room: one tenant cannot hold
  everything, so another's request finds room at once. A request larger than its tenant's share
  gets 413 (split it). A tenant at its share waits in its part of the waiting room.
- **dispatch.** A request is admitted as soon as it fits, on arrival as on every release, in tag
  order. A request that fits may go ahead of an earlier-tagged one waiting for more room only if
  it is another tenant's, keeps its tenant within its weighted fair share of the capacity among the
  busy tenants, and the one waiting has not yet been passed by its own cost in engine requests:
  small requests are not held behind a large one, and the large one is not starved by them.

With no tenants configured every request belongs to the open tenant, and the same rules share the
engines between its jobs (no share applies: there is no other tenant to keep room for).
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
# The part of the engines' capacity, and of the HTTP waiting room, that one tenant without a
# max_inflight of its own may hold when several tenants are configured (limits.tenant_share). One
# half: whatever one tenant sends, half the capacity stays for the others, so a second tenant's
# request (up to half the capacity) is admitted at once; and a lone busy tenant still keeps the
# engines full, since half of limits.max_inflight_engine_requests (2048 of 4096) is far more than an
# engine's running batch (the rest waits inside the engine in priority order anyway).
DEFAULT_TENANT_SHARE = 0.5


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
    passed: int = 0  # engine requests of later-tagged requests admitted ahead of it while it waited
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
        tenant_share: float | None = DEFAULT_TENANT_SHARE,
    ) -> None:
        """``tenant_share``: the part of ``max_inflight`` a tenant without a ``max_inflight`` of its
        own may hold, and the part of ``max_waiting`` every tenant's HTTP requests may take; it
        applies when more than one tenant is configured (``policies``), None turns it off."""
        self.max_inflight = max_inflight
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self.policies = policies or {}
        self.isolate_cache = isolate_cache
        self.tenant_share = tenant_share if len(self.policies) > 1 else None
        self.inflight = 0  # engine requests admitted, all tenants
        self.waiting_cost = 0  # engine requests of HTTP requests waiting for admission
        self._tenant_inflight: dict[str, int] = {}
        self._tenant_waiting: dict[str, int] = {}  # engine requests of a tenant's HTTP requests waiting
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

    def _share_of(self, total: int) -> int:
        assert self.tenant_share is not None
        return max(1, math.ceil(self.tenant_share * total))

    def inflight_limit(self, tenant: str) -> int | None:
        """The engine requests ``tenant`` may have in flight: its own ``max_inflight``, else its share
        of the capacity when several tenants are configured, else no limit of its own."""
        limit = self.policy(tenant).max_inflight
        if limit is None and self.tenant_share is not None:
            limit = self._share_of(self.max_inflight)
        return limit

    def waiting_limit(self) -> int | None:
        """The engine requests of one tenant's HTTP requests that may wait for admission."""
        return None if self.tenant_share is None else self._share_of(self.max_waiting)

    def _limit_name(self, tenant: str) -> str:
        if self.policy(tenant).max_inflight is not None:
            return f"its max_inflight of {self.policy(tenant).max_inflight}"
        return (
            f"its share of {self.inflight_limit(tenant)} (limits.tenant_share {self.tenant_share:g} of "
            f"limits.max_inflight_engine_requests {self.max_inflight})"
        )

    def _tenant_full(self, ticket: Ticket) -> bool:
        limit = self.inflight_limit(ticket.tenant)
        return limit is not None and self._tenant_inflight.get(ticket.tenant, 0) + ticket.cost > limit

    def _busy_weight(self) -> float:
        """The weights of the tenants with requests running or waiting, together."""
        return sum(self.policy(t).weight for t, jobs in self._busy_jobs.items() if jobs)

    def _may_pass(self, ticket: Ticket, head: Ticket, held_back: set[str], busy_weight: float) -> bool:
        """Whether ``ticket``, which fits, may be admitted ahead of ``head``, the first waiter in tag
        order that the free capacity cannot take: only another tenant's request (a tenant's own
        requests keep their order), within its tenant's fair share (its weight's part of the
        capacity among the busy tenants), and only until ``head`` has been passed by its own cost in
        engine requests (so that it cannot be starved)."""
        fair_share = self.max_inflight * self.policy(ticket.tenant).weight / busy_weight
        return (
            ticket.tenant not in held_back
            and head.passed + ticket.cost <= head.cost
            and self._tenant_inflight.get(ticket.tenant, 0) + ticket.cost <= fair_share
        )

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
        limit = self.inflight_limit(tenant)
        if cost > self.max_inflight:
            raise AdmissionRefused(
                413,
                "too_large",
                f"this request needs {cost} engine requests, over the in-flight limit of "
                f"{self.max_inflight} (limits.max_inflight_engine_requests); split it",
            )
        if limit is not None and cost > limit:
            if policy.max_inflight is not None:
                message = (
                    f"this request needs {cost} engine requests, over tenant {tenant!r}'s max_inflight of "
                    f"{policy.max_inflight}; split it"
                )
            else:
                message = (
                    f"this request needs {cost} engine requests, over tenant {tenant!r}'s share of "
                    f"{limit} in flight (limits.tenant_share {self.tenant_share:g} of "
                    f"limits.max_inflight_engine_requests {self.max_inflight}); split it, or ask the "
                    "operator for a max_inflight of the tenant's own"
                )
            raise AdmissionRefused(413, "too_large", message)
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
        # A request that fits is admitted now, in the same order as on every release.
        self._waiters.append(ticket)
        self._dispatch()
        if ticket in self._running:
            return
        if not wait:
            try:
                self._check_waiting_room(ticket)
            except AdmissionRefused:
                self._waiters.remove(ticket)
                raise
            self.waiting_cost += ticket.cost
            self._tenant_waiting[ticket.tenant] = self._tenant_waiting.get(ticket.tenant, 0) + ticket.cost
        ticket.wait_counted = not wait
        ticket.admitted = asyncio.get_running_loop().create_future()
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

    def _check_waiting_room(self, ticket: Ticket) -> None:
        """Why an HTTP request that cannot start now may not wait either (raises), if it may not: its
        tenant at its own max_inflight, its tenant's share of the waiting room taken, or the waiting
        room full."""
        tenant, policy = ticket.tenant, self.policy(ticket.tenant)
        mine = self._tenant_inflight.get(tenant, 0)
        if policy.max_inflight is not None and mine + ticket.cost > policy.max_inflight:
            metrics.TENANT_REFUSED.labels(tenant, "max_inflight").inc()
            raise AdmissionRefused(
                429,
                "rate_limited",
                f"tenant {tenant!r} has {mine} engine requests in flight, at its max_inflight of "
                f"{policy.max_inflight}; retry after the delay in Retry-After",
                1.0,
            )
        share, waiting = self.waiting_limit(), self._tenant_waiting.get(tenant, 0)
        if share is not None and waiting + ticket.cost > share:
            metrics.TENANT_REFUSED.labels(tenant, "waiting_share").inc()
            raise AdmissionRefused(
                429,
                "rate_limited",
                f"tenant {tenant!r} has {waiting} engine requests waiting for admission, at its share of "
                f"the waiting room ({share}: limits.tenant_share {self.tenant_share:g} of "
                f"limits.max_waiting_engine_requests {self.max_waiting}) with {mine} in flight; retry "
                "after the delay in Retry-After",
                1.0,
            )
        if self.waiting_cost + ticket.cost > self.max_waiting:
            metrics.TENANT_REFUSED.labels(tenant, "max_waiting").inc()
            raise AdmissionRefused(
                429,
                "overloaded",
                f"the judge has {self.inflight} engine requests in flight "
                f"(limits.max_inflight_engine_requests {self.max_inflight}) and {self.waiting_cost} "
                f"waiting (limits.max_waiting_engine_requests {self.max_waiting}); retry after the "
                "delay in Retry-After",
                1.0,
            )

    def _unwait(self, ticket: Ticket) -> None:
        self._waiters.remove(ticket)
        if ticket.wait_counted:
            ticket.wait_counted = False
            self.waiting_cost -= ticket.cost
            self._tenant_waiting[ticket.tenant] -= ticket.cost
            if not self._tenant_waiting[ticket.tenant]:
                del self._tenant_waiting[ticket.tenant]
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
        """Admit waiters in tag order while they fit. One held back by its tenant's limit does not
        hold back other tenants. One too large for the free capacity (the head) holds back what
        comes after it, except another tenant's request that fits and may pass it (``_may_pass``):
        small requests are not queued behind a large one, and the large one is not starved."""
        head: Ticket | None = None
        held_back: set[str] = set()  # tenants with a request waiting for capacity: theirs keep order
        busy_weight = self._busy_weight()  # every waiter's tenant is busy: not zero when it is read
        for ticket in sorted(self._waiters, key=lambda t: (t.start, t.seq)):
            if self._tenant_full(ticket):
                continue
            if self.inflight + ticket.cost > self.max_inflight:
                head = head or ticket
                held_back.add(ticket.tenant)
                continue
            if head is not None:
                if not self._may_pass(ticket, head, held_back, busy_weight):
                    continue
                head.passed += ticket.cost
            self._unwait(ticket)
            self._start(ticket)
            if ticket.admitted is not None and not ticket.admitted.done():
                ticket.admitted.set_result(None)

    def status(self) -> dict:
        return {
            "inflight": self.inflight,
            "waiting": len(self._waiters),
            "tenants": {t: n for t, n in self._tenant_inflight.items() if n},
            "tenants_waiting": dict(self._tenant_waiting),
        }


def retry_after(seconds: float | None) -> str:
    return str(max(1, math.ceil(seconds or 1)))
