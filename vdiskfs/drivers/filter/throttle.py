"""Filter ``throttle``: keep an image's I/O within limits, as QEMU's throttle filter and
throttle groups (``block/throttle.c``, ``block/throttle-groups.c``) and Firecracker's per-drive
rate limiters do.

The limits and the bucket arithmetic are in :mod:`vdiskfs.drivers.filter.throttle_buckets`.
Here the node and the group that holds the buckets:

- a :class:`ThrottleGroup` is one budget; several nodes (the images of one mount given the same
  ``group=NAME``, the disks of one VM) may share it. Groups live in a :class:`ThrottleGroups`
  that the mount or the VM owns -- never in the process: two mounts in one process (the tests)
  must not share budgets by accident;
- reads, writes, write-zeroes and discards are throttled (QEMU counts the last two as writes of
  their length); flush and block status pass at once;
- a request that may not start waits in its direction's queue, first in first out across every
  member of the group: only the head of a queue computes its wait and sleeps; when it starts,
  it wakes the next. Any number of admitted requests run at once. A waiter cancelled anywhere
  leaves its queue and, if it was the head, hands the turn on, charging nothing;
- new limits (the control file ``stats/<stem>/throttle`` of a mount, :meth:`ThrottleNode.controls`)
  apply to the whole group at once, start from empty buckets as QEMU's do, and wake the heads of
  the queues to compute their wait again.

Counters (the node's stats file): ``throttled_reads`` and ``throttled_writes`` (requests that had
to wait), ``throttled_ns`` (the time they waited, all together), ``queued_reads`` and
``queued_writes`` (this node's requests waiting now), as Firecracker's
``rate_limiter_throttled_events``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from vdiskfs.block.node import BlockNode, Buffer, Control, FilterNode
from vdiskfs.block.stats import Counters
from vdiskfs.drivers.filter.throttle_buckets import (
    NS_PER_SECOND,
    Direction,
    ThrottleLimits,
    ThrottleSpec,
    ThrottleState,
    parse_throttle,
)
from vdiskfs.errors import RangeError

__all__ = ["ThrottleCounters", "ThrottleGroup", "ThrottleGroups", "ThrottleNode", "throttled"]

log = logging.getLogger(__name__)

Clock = Callable[[], int]


def trio_clock_ns() -> int:
    """The trio clock in nanoseconds: the clock the waits sleep on (a MockClock in tests)."""
    return int(trio.current_time() * NS_PER_SECOND)


@dataclass(slots=True)
class ThrottleCounters(Counters):
    throttled_reads: int = 0
    throttled_writes: int = 0
    throttled_ns: int = 0
    queued_reads: int = 0
    queued_writes: int = 0


class _Turn:
    """A waiting request's place in its queue; ``event`` is set when it becomes the head."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()


class ThrottleGroup:
    """One budget: the buckets and a FIFO queue per direction, shared by every member."""

    def __init__(self, name: str, limits: ThrottleLimits, *, explicit: bool = True,
                 clock: Clock = trio_clock_ns) -> None:
        self.name = name
        self._clock = clock
        self._state: ThrottleState | None = None
        self._limits = limits
        #: Limits given by a member (not only joined by name): another member's must agree.
        self.explicit = explicit
        self._queues: tuple[deque[_Turn], deque[_Turn]] = (deque(), deque())
        #: Set (and replaced) when the limits change: the heads compute their wait again.
        self._changed = trio.Event()

    @property
    def limits(self) -> ThrottleLimits:
        return self._limits

    def _buckets(self) -> ThrottleState:
        # Created at the first request, not at construction: the trio clock exists only in
        # a run, and a mount builds its groups before it needs them.
        if self._state is None:
            self._state = ThrottleState(self._limits, self._clock())
        return self._state

    def configure(self, limits: ThrottleLimits) -> None:
        """Apply new limits to every member now; the buckets start empty."""
        self._limits = limits
        if self._state is not None:
            self._state.configure(limits, self._clock())
        self._changed.set()
        self._changed = trio.Event()

    def queue_length(self, direction: Direction) -> int:
        return len(self._queues[direction])

    async def admit(self, direction: Direction, size: int) -> int | None:
        """Wait until a request of ``size`` bytes may start, charge it; the nanoseconds it
        waited in the queue, or None when it started at once (new limits can let a queued
        request go without the clock moving: it was throttled all the same)."""
        queue = self._queues[direction]
        state = self._buckets()
        if not queue and state.wait_ns(direction, self._clock()) == 0:
            state.account(direction, size)
            return None
        turn = _Turn()
        queue.append(turn)
        start = self._clock()
        try:
            if queue[0] is not turn:
                await turn.event.wait()
            while True:
                wait = self._buckets().wait_ns(direction, self._clock())
                if not wait:
                    break
                changed = self._changed
                with trio.move_on_after(wait / NS_PER_SECOND):
                    await changed.wait()
            # No checkpoint between the charge and leaving the queue: a cancellation either
            # comes before the charge (nothing charged) or not at all.
            self._buckets().account(direction, size)
        finally:
            head = queue[0] is turn
            queue.remove(turn)
            if head and queue:
                queue[0].event.set()
        return self._clock() - start


class ThrottleGroups:
    """The throttle groups of one mount or one VM, by name."""

    def __init__(self, clock: Clock = trio_clock_ns) -> None:
        self._groups: dict[str, ThrottleGroup] = {}
        self._clock = clock

    def join(self, name: str, limits: ThrottleLimits | None, *, who: str) -> ThrottleGroup:
        """The group ``name``, created if new. ``limits`` None: take the group's as they are
        (or none yet); else they must agree with the limits another member gave."""
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = ThrottleGroup(
                name, limits or ThrottleLimits(), explicit=limits is not None,
                clock=self._clock)
        elif limits is not None:
            if group.explicit and group.limits != limits:
                raise RangeError(
                    f"throttle group {name!r} has the limits {group.limits.options()!r} "
                    f"already; give the same ones, or none to share them",
                    path=who, field="group")
            if not group.explicit:
                group.configure(limits)
                group.explicit = True
        return group


class ThrottleNode(FilterNode):
    """Throttles the requests to ``child`` with the budget of ``group``."""

    driver = "throttle"
    counters_class = ThrottleCounters
    counters: ThrottleCounters

    def __init__(self, child: BlockNode, group: ThrottleGroup) -> None:
        super().__init__(child)
        self.group = group

    def info(self) -> dict[str, Any]:
        return {"group": self.group.name, "limits": self.group.limits.options()}

    async def _admit(self, direction: Direction, size: int) -> None:
        counters = self.counters
        reading = direction is Direction.READ
        group = self.group
        if not group.limits.enabled:
            return
        # Counted as queued from the start: the request may wait in admit() without ever
        # returning here (cancelled), and the count must come down then too.
        if reading:
            counters.queued_reads += 1
        else:
            counters.queued_writes += 1
        try:
            waited = await group.admit(direction, size)
        finally:
            if reading:
                counters.queued_reads -= 1
            else:
                counters.queued_writes -= 1
        if waited is not None:
            counters.throttled_ns += waited
            if reading:
                counters.throttled_reads += 1
            else:
                counters.throttled_writes += 1

    async def _pread(self, offset: int, length: int) -> Buffer:
        await self._admit(Direction.READ, length)
        return await self.file.pread(offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self._admit(Direction.WRITE, len(data))
        await self.file.pwrite(offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self._admit(Direction.WRITE, length)
        await self.file.zero(offset, length, may_unmap=may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        await self._admit(Direction.WRITE, length)
        await self.file.discard(offset, length)

    # -- the control file ---------------------------------------------------------------------

    def controls(self) -> list[Control]:
        return [Control("throttle", self._show_limits, self._set_limits)]

    def _show_limits(self) -> str:
        limits = self.group.limits.options()
        group = f"group={self.group.name}"
        return f"{limits},{group}\n" if limits else f"{group}\n"

    def _set_limits(self, text: str) -> None:
        source = f"{self.label}: throttle control file"
        spec = parse_throttle(" ".join(text.split()), source=source)
        if spec.group is not None and spec.group != self.group.name:
            raise RangeError(f"the group is {self.group.name!r}; it cannot change while open",
                             path=source, field="group")
        limits = spec.limits or ThrottleLimits()
        log.info("%s: throttle group %s: limits %s", self.label, self.group.name,
                 limits.options() or "none")
        self.group.configure(limits)


async def throttled(node: BlockNode, groups: ThrottleGroups, spec: ThrottleSpec,
                    default_group: str) -> ThrottleNode:
    """``node`` under a throttle filter in ``spec``'s group (``default_group`` when it names
    none: a budget of its own). ``node`` is closed when this fails."""
    try:
        group = groups.join(spec.group or default_group, spec.limits, who=node.label)
        top = ThrottleNode(node, group)
    except BaseException:
        await node.aclose()
        raise
    await top.open()
    top.warnings = node.warnings
    return top
