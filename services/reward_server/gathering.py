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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

Incomplete = Literal["judge", "error"]


class GroupIncomplete(Exception):
    """The group did not fill up in time (and was not judged): the waiting call's error."""


@dataclass
class _Group:
    size: int
    members: list[Any] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    closed: bool = False


Judge = Callable[[list[Any]], Awaitable[list[Any]]]


class GroupGatherer:
    """Collect members per key until ``size`` of them arrived, then run ``judge`` on them once."""

    def __init__(self, max_open: int = 10_000) -> None:
        self.max_open = max_open
        self._open: dict[Hashable, _Group] = {}
        self.judged = 0
        self.incomplete = 0
        self._tasks: set[asyncio.Task] = set()  # judging groups (a reference, so none is collected)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def open_groups(self) -> int:
        return len(self._open)

    async def submit(
        self,
        key: Hashable,
        member: Any,
        *,
        size: int,
        timeout_s: float,
        judge: Judge,
        incomplete: Incomplete = "judge",
    ) -> Any:
        """Add ``member`` to the open group of ``key`` and wait for its result (``judge``'s answer for
        this member). Raises GroupIncomplete, or whatever ``judge`` raised for the whole group."""
        group = self._open.get(key)
        if group is not None and group.size != size:
            raise ValueError(
                f"this prompt's open group was started with group size {group.size}, not {size}; "
                "send the same group size for every sample of a group"
            )
        if group is None:
            if len(self._open) >= self.max_open:
                raise OverflowError(f"{self.max_open} groups are already waiting to fill up")
            group = self._open[key] = _Group(size)
            loop = asyncio.get_running_loop()
            group.timer = loop.call_later(
                timeout_s, lambda: self._expire(key, group, judge, incomplete, timeout_s)
            )
        future = asyncio.get_running_loop().create_future()
        group.members.append(member)
        group.waiters.append(future)
        if len(group.members) == size:
            self._close(key, group)
            self._spawn(self._judge(group, judge))
        # shield: a caller that goes away does not cancel the group's judging for the others
        return await asyncio.shield(future)

    def _close(self, key: Hashable, group: _Group) -> None:
        group.closed = True
        if group.timer is not None:
            group.timer.cancel()
        if self._open.get(key) is group:
            del self._open[key]

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
