"""Gathering groups for trainers that score one sample per call.

Win rates compare the responses of one prompt with each other, but several trainers ask for a
reward as each sample finishes: OpenRLHF's agent executor posts one query per ``/get_reward``
call, verl's standalone reward loop and TRL's async trainer do the same. ``GroupGatherer`` holds
such calls until the group of their prompt is complete (its size is given by the client), judges the
group once, and answers each waiting call with its own member's result.

A group that does not fill up within its deadline is never left hanging: with ``incomplete="judge"``
what arrived is judged (two responses or more; a lone response gets an error), with ``"error"``
every waiting call gets the error. Groups are keyed by tenant, job, prompt and the judging options,
so two jobs (or two tenants) never share a group; when a prompt's group is full, its next samples
start a new group (a prompt drawn twice in one batch makes two groups, in arrival order).

What waits here is bounded per tenant, so that one tenant's open groups cannot make everyone's
gathered calls fail: a tenant holds at most ``TenantBounds.groups`` open groups and
``TenantBounds.nbytes`` bytes of waiting samples (``limits.tenant_share`` of ``max_open``, and
``limits.max_gathered_bytes``), all tenants together at most ``max_open`` groups and ``max_bytes``
bytes. Past a bound a call is refused at once (``GatherRefused``, a 429 naming it). A sample leaves
its group when its caller goes away (the client disconnected, or the call was cancelled) or its
deadline (``fairness.DEADLINE``) passes before the group is complete: nothing is kept for a caller
that can no longer be answered, and a group left empty is closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from .fairness import DEADLINE, DEFAULT_TENANT_SHARE

logger = logging.getLogger(__name__)

Incomplete = Literal["judge", "error"]

MAX_OPEN = 10_000  # open groups, all tenants together
MAX_BYTES = 1 << 30  # bytes of waiting samples, all tenants together
TENANT_BYTES = 256 << 20  # limits.max_gathered_bytes' default


class GroupIncomplete(Exception):
    """The group did not fill up in time (and was not judged): the waiting call's error."""


class GatherRefused(OverflowError):
    """A sample refused at once because a bound on what waits here is reached: ``code`` is
    ``rate_limited`` (the tenant's own bound) or ``overloaded`` (all tenants' together)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class TenantBounds:
    """What one tenant may keep waiting here: open groups and bytes of samples."""

    groups: int = math.ceil(MAX_OPEN * DEFAULT_TENANT_SHARE)
    nbytes: int = TENANT_BYTES
    share: float = DEFAULT_TENANT_SHARE  # what ``groups`` was made from, for messages


@dataclass
class _Group:
    size: int
    tenant: Hashable = None
    members: list[Any] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # bytes of each member
    timer: asyncio.TimerHandle | None = None
    closed: bool = False


Judge = Callable[[list[Any]], Awaitable[list[Any]]]


class GroupGatherer:
    """Collect members per key until ``size`` of them arrived, then run ``judge`` on them once."""

    def __init__(self, max_open: int = MAX_OPEN, max_bytes: int = MAX_BYTES) -> None:
        self.max_open, self.max_bytes = max_open, max_bytes
        self._open: dict[Hashable, _Group] = {}
        self._bytes = 0  # of the members of open groups
        self._tenant_groups: dict[Hashable, int] = {}
        self._tenant_bytes: dict[Hashable, int] = {}
        self.judged = 0
        self.incomplete = 0
        self.withdrawn = 0  # members taken out again: their caller went away or its deadline passed
        self._tasks: set[asyncio.Task] = set()  # judging groups (a reference, so none is collected)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def open_groups(self) -> int:
        return len(self._open)

    def usage(self, tenant: Hashable) -> tuple[int, int]:
        """The tenant's open groups and the bytes of its samples waiting in them."""
        return self._tenant_groups.get(tenant, 0), self._tenant_bytes.get(tenant, 0)

    def _check(self, tenant: Hashable, new_group: bool, nbytes: int, bounds: TenantBounds) -> None:
        groups, held = self.usage(tenant)
        if new_group and groups >= bounds.groups:
            raise GatherRefused(
                "rate_limited",
                f"tenant {tenant!r} has {groups} groups waiting to fill up, its share of the open "
                f"groups ({bounds.groups}: limits.tenant_share {bounds.share:g} of {self.max_open}); "
                "send the rest of its groups' samples, or retry after the delay in Retry-After",
            )
        if held + nbytes > bounds.nbytes:
            raise GatherRefused(
                "rate_limited",
                f"tenant {tenant!r} has {held} bytes of samples waiting for their groups; this one "
                f"({nbytes} bytes) would pass limits.max_gathered_bytes ({bounds.nbytes}); send the rest "
                "of its groups' samples, or retry after the delay in Retry-After",
            )
        if new_group and len(self._open) >= self.max_open:
            raise GatherRefused("overloaded", f"{self.max_open} groups are already waiting to fill up")
        if self._bytes + nbytes > self.max_bytes:
            raise GatherRefused(
                "overloaded", f"{self._bytes} bytes of samples are already waiting for their groups"
            )

    async def submit(
        self,
        key: Hashable,
        member: Any,
        *,
        size: int,
        timeout_s: float,
        judge: Judge,
        incomplete: Incomplete = "judge",
        tenant: Hashable = None,
        nbytes: int = 0,
        bounds: TenantBounds | None = None,
    ) -> Any:
        """Add ``member`` (``nbytes`` bytes, ``tenant``'s: ``key`` must name the tenant, so that no
        group is shared between tenants) to the open group of ``key`` and wait for
        its result (``judge``'s answer for this member). Raises GatherRefused at once past a bound,
        GroupIncomplete, or whatever ``judge`` raised for the whole group. A member whose caller is
        cancelled, or whose deadline passes, before its group is complete leaves the group."""
        group = self._open.get(key)
        if group is not None and group.size != size:
            raise ValueError(
                f"this prompt's open group was started with group size {group.size}, not {size}; "
                "send the same group size for every sample of a group"
            )
        if group is not None:
            tenant = group.tenant  # a group is one tenant's (its key names the tenant)
        self._check(tenant, group is None, nbytes, bounds or TenantBounds())
        loop = asyncio.get_running_loop()
        if group is None:
            group = self._open[key] = _Group(size, tenant)
            self._tenant_groups[tenant] = self._tenant_groups.get(tenant, 0) + 1
            group.timer = loop.call_later(
                timeout_s, lambda: self._expire(key, group, judge, incomplete, timeout_s)
            )
        future = loop.create_future()
        group.members.append(member)
        group.waiters.append(future)
        group.sizes.append(nbytes)
        self._add_bytes(tenant, nbytes)
        if len(group.members) == size:
            self._close(key, group)
            self._spawn(self._judge(group, judge))
        deadline = DEADLINE.get()
        try:
            # shield: a caller that goes away does not cancel the group's judging for the others
            if deadline is None:
                return await asyncio.shield(future)
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            if future.done():  # answered at the last moment
                return future.result()
            where = (
                "while its group was being judged"
                if group.closed
                else f"with its group at {len(group.members)} of its {group.size} responses"
            )
            self._withdraw(key, group, future)
            raise GroupIncomplete(
                f"this call's deadline (X-Request-Timeout, at most limits.request_timeout_s) passed {where}"
            ) from None
        except BaseException:
            self._withdraw(key, group, future)
            raise

    def _add_bytes(self, tenant: Hashable, nbytes: int) -> None:
        self._bytes += nbytes
        held = self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + nbytes
        if not held:
            del self._tenant_bytes[tenant]

    def _withdraw(self, key: Hashable, group: _Group, future: asyncio.Future) -> None:
        """Take a member whose caller is gone out of its group, if the group is still open (once
        complete it is being judged for the others, and stays so)."""
        if not future.done():
            future.cancel()
        if group.closed or future not in group.waiters:
            return
        k = group.waiters.index(future)
        del group.members[k], group.waiters[k]
        self._add_bytes(group.tenant, -group.sizes.pop(k))
        self.withdrawn += 1
        if not group.members:
            self._close(key, group)

    def _close(self, key: Hashable, group: _Group) -> None:
        """The group takes no more members: judged now, expired, or left empty."""
        if group.closed:
            return
        group.closed = True
        if group.timer is not None:
            group.timer.cancel()
        if self._open.get(key) is group:
            del self._open[key]
        self._add_bytes(group.tenant, -sum(group.sizes))
        left = self._tenant_groups[group.tenant] = self._tenant_groups.get(group.tenant, 0) - 1
        if left <= 0:
            del self._tenant_groups[group.tenant]

    def _expire(
        self, key: Hashable, group: _Group, judge: Judge, incomplete: Incomplete, timeout_s: float
    ) -> None:
        if group.closed:
            return
        self._close(key, group)
        self.incomplete += 1
        n = len(group.members)
        why = (
            f"the group got {n} of its {group.size} responses within {timeout_s:g} s "
            "(group_timeout_s); send every response of the group, or a smaller group_size"
        )
        if incomplete == "judge" and n >= 2:
            logger.info("judging an incomplete group: %s", why)
            self._spawn(self._judge(group, judge))
            return
        for future in group.waiters:
            if not future.done():
                future.set_exception(GroupIncomplete(why))

    async def _judge(self, group: _Group, judge: Judge, note: str | None = None) -> None:
        try:
            results = await judge(list(group.members))
        except BaseException as exc:  # every waiter learns why; nothing is left hanging
            for future in group.waiters:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        self.judged += 1
        for future, result in zip(group.waiters, results, strict=True):
            if not future.done():
                future.set_result(result)
