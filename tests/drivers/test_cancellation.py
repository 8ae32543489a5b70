"""Requests cancelled in the middle, on every format (issue 9): nothing stays in flight, nothing
waits for ever, the node keeps working, and the image stays consistent.

A :class:`Gate` filter sits between the format node and its file: it lets a number of requests
through and then holds every later one until released, so a test cancels a reader or a writer
at a chosen point inside the driver -- while it loads a table, reads data, copies on write or
updates metadata -- and tries every such point in turn. (What the engine does with a host
request in flight when its caller is cancelled is tested with a really slow file in
``tests/fs/test_mount_concurrency.py`` and in ``tests/drivers/protocol/test_engine.py``.)
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support.concurrency import (
    VARIANTS,
    assert_nothing_in_flight,
    assert_one_of_values,
    copy_image,
    settle,
)
from tests.support.workload import (
    assert_clean,
    assert_image_matches,
    qemu_compare,
)
from vdiskfs.block.context import OpenContext, OpenOptions
from vdiskfs.block.node import BlockNode, Buffer, FilterNode
from vdiskfs.block.registry import get_driver
from vdiskfs.drivers.protocol.file import FileNode

KiB = 1 << 10
#: Seconds a test step may take before it counts as hung (each takes well under one).
TIMEOUT = 30


class Gate(FilterNode):
    """Passes every request through to the file, unless closed by :meth:`hold_after`: then
    ``n`` more requests pass and every later one waits for :meth:`release` (``held`` of them
    wait now)."""

    def __init__(self, child: BlockNode) -> None:
        super().__init__(child)
        self._budget: int | None = None
        self._released = trio.Event()
        self.held = 0

    async def open(self) -> None:
        self.size = self.file.size
        self.growable = self.file.growable

    def hold_after(self, n: int) -> None:
        self._budget = n
        self._released = trio.Event()

    def release(self) -> None:
        self._budget = None
        self._released.set()

    async def _pass(self) -> None:
        if self._budget is None:
            return
        if self._budget > 0:
            self._budget -= 1
            return
        self.held += 1
        try:
            await self._released.wait()
        finally:
            self.held -= 1

    def _grown(self) -> None:
        self.size = max(self.size, self.file.size)

    async def _pread(self, offset: int, length: int) -> Buffer:
        await self._pass()
        return await self.file.pread(offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self._pass()
        await self.file.pwrite(offset, data)
        self._grown()

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self._pass()
        await self.file.zero(offset, length, may_unmap=may_unmap)
        self._grown()

    async def _discard(self, offset: int, length: int) -> None:
        await self._pass()
        await self.file.discard(offset, length)

    async def _flush(self) -> None:
        await self._pass()


async def open_gated(path: Path, fmt: str, *, read_only: bool) -> tuple[BlockNode, Gate]:
    """The format node of ``path`` over a :class:`Gate` over its file (backing files and
    extents open as usual, ungated)."""
    file = FileNode(str(path), read_only=read_only)
    await file.open()
    gate = Gate(file)
    await gate.open()
    ctx = OpenContext(OpenOptions(read_only=read_only), path=str(path),
                      chain=(os.path.realpath(path),))
    node = get_driver(fmt)(gate, ctx)
    try:
        await node.open()
    except BaseException:
        await node.aclose()
        raise
    return node, gate


async def until_held(gate: Gate) -> bool:
    """Wait until every task is blocked; whether one of them waits in the gate."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.002)
    return gate.held > 0


#: Cancel points tried: a request is cancelled while the n-th request it causes below the
#: format node waits (0: the first, a table load on a fresh open; later: data, copies, tables).
POINTS = range(6)


# -- readers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_cancelled_readers_leave_nothing_in_flight(variant_templates: dict[str, Path],
                                                         name: str, tmp_path: Path) -> None:
    """Readers cancelled at each point, while others of the same ranges are not: the others
    read right (a table load abandoned half-way is done again by whoever needs it), nothing
    is left in flight, and a fresh pass reads the whole image right."""
    image = copy_image(variant_templates, name, tmp_path)
    reference = image.reference.read_bytes()
    size = len(reference)
    rng = random.Random(name)
    unit = VARIANTS[name].unit
    held_at: list[int] = []
    for point in POINTS:
        # A fresh open each time: cold caches, so readers load tables.
        node, gate = await open_gated(image.path, image.fmt, read_only=True)
        try:
            ranges = []
            for _ in range(4):
                offset = rng.randrange(size - 1)
                ranges.append((offset, min(size - offset, rng.randrange(1, 3 * unit))))
            gate.hold_after(point)
            # A reader left waiting for ever fails the test rather than hanging it.
            with trio.fail_after(TIMEOUT):
                if await _cancel_some_readers(node, gate, reference, ranges):
                    held_at.append(point)
                await settle(node)
                assert bytes(await node.pread(0, size)) == reference
        finally:
            await node.aclose()
    # The reads needed more requests below the format than the first cancel points.
    assert held_at[:1] == [0], held_at


async def _cancel_some_readers(node: BlockNode, gate: Gate, reference: bytes,
                               ranges: list[tuple[int, int]]) -> bool:
    """Readers of ``ranges``, then once they wait, a second reader of each range; the first
    ones are cancelled, the gate released, and the second ones must read right. Returns
    whether the first ones were held in the gate when cancelled."""
    survivors_done = 0

    async def read(offset: int, length: int) -> None:
        got = bytes(await node.pread(offset, length))
        assert got == reference[offset : offset + length], f"{offset:#x}+{length}"

    async def survivor(offset: int, length: int) -> None:
        nonlocal survivors_done
        await read(offset, length)
        survivors_done += 1

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as doomed:
            # The doomed readers go first: they are the ones that load what the ranges need,
            # and the survivors wait for their loads.
            async with trio.open_nursery() as doomed_nursery:
                for offset, length in ranges:
                    doomed_nursery.start_soon(read, offset, length)
                held = await until_held(gate)
                for offset, length in ranges:
                    nursery.start_soon(survivor, offset, length)
                await trio.testing.wait_all_tasks_blocked(cushion=0.002)
                doomed.cancel()
        gate.release()
    assert survivors_done == len(ranges)
    return held


# -- writers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_cancelled_writers_leave_a_consistent_image(variant_templates: dict[str, Path],
                                                          name: str, tmp_path: Path) -> None:
    """Rounds of disjoint writes (and zero requests) on one open node, half of them cancelled
    at each point of their way down: a cancelled write leaves each byte of its range old or
    new, a finished one new, the node goes on writing, nothing is in flight after a round, and
    after closing, qemu-img finds the image clean (no leak either: a cancelled request is not a
    crash) and reading as the model."""
    image = copy_image(variant_templates, name, tmp_path)
    model = bytearray(image.reference.read_bytes())
    size = len(model)
    rng = random.Random(name)
    unit = VARIANTS[name].unit
    node, gate = await open_gated(image.path, image.fmt, read_only=False)
    held_rounds = 0
    try:
        for round_ in range(2 * len(POINTS)):
            ops = _disjoint_ops(rng, size, unit, count=8)
            old = bytes(model)

            async def write(offset: int, data: bytes, zero: bool) -> None:
                if zero:
                    await node.zero(offset, len(data))
                else:
                    await node.pwrite(offset, data)
                model[offset : offset + len(data)] = data

            gate.hold_after(POINTS[round_ % len(POINTS)])
            with trio.fail_after(TIMEOUT):
                held_rounds += await _cancel_some_writers(gate, ops, write)
            assert_nothing_in_flight(node)
            # What the cancelled writes left: each byte old or new; the model takes it.
            for i, (offset, data, _zero) in enumerate(ops):
                end = offset + len(data)
                got = bytes(await node.pread(offset, len(data)))
                if i % 2 == 0:
                    assert got == data, f"finished write at {offset:#x} lost"
                else:
                    assert_one_of_values(got, offset, old[offset:end], data)
                model[offset:end] = got
            assert bytes(await node.pread(0, size)) == model
        await node.flush()
        await settle(node)
    finally:
        await node.aclose()
    assert held_rounds >= len(POINTS), "the writes were rarely cancelled while held"
    image.reference.write_bytes(model)
    if VARIANTS[name].checkable:
        assert_clean(image.path, image.fmt)
    qemu_compare(image.path, image.fmt, image.reference)
    await assert_image_matches(image.path, image.reference)


async def _cancel_some_writers(gate: Gate, ops: list[tuple[int, bytes, bool]],
                               write: Callable[[int, bytes, bool], Awaitable[None]]) -> bool:
    """Run ``write`` for every op at once, the odd ones in a scope cancelled once every task
    waits; whether a request waited in the gate then."""
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as doomed:
            async with trio.open_nursery() as doomed_nursery:
                for i, (offset, data, zero) in enumerate(ops):
                    (doomed_nursery if i % 2 else nursery).start_soon(write, offset, data, zero)
                held = await until_held(gate)
                doomed.cancel()
        gate.release()
    return held


def _disjoint_ops(rng: random.Random, size: int, unit: int,
                  count: int) -> list[tuple[int, bytes, bool]]:
    """``count`` disjoint ``(offset, data, zero)`` across unit boundaries, some of them zero
    requests (with ``data`` their zeros)."""
    ops: list[tuple[int, bytes, bool]] = []
    taken: list[tuple[int, int]] = []
    while len(ops) < count:
        length = rng.randrange(1, min(2 * unit, 200 * KiB))
        offset = rng.randrange(size - length)
        if any(offset < end and start < offset + length for start, end in taken):
            continue
        taken.append((offset, offset + length))
        zero = rng.random() < 0.2
        ops.append((offset, bytes(length) if zero else rng.randbytes(length), zero))
    return ops


async def _write_then_set(node: BlockNode, offset: int, data: bytes,
                          finished: trio.Event) -> None:
    await node.pwrite(offset, data)
    finished.set()


@pytest.mark.parametrize("backing", [False, True])
async def test_cancelled_qed_allocation_gives_back_or_finishes(tmp_path: Path,
                                                               backing: bool) -> None:
    """One qed write that needs new clusters and a new L2 table, cancelled while each of its
    requests waits in turn: cancelled before its L2 entries are decided, it gives the
    clusters back (the file is cut back to where it was); after that, the write has happened
    for readers and its tables reach the file at the next flush. Either way the image is
    clean, without a leak, and reads as the node did."""
    directory = tmp_path / "template"
    directory.mkdir()
    options = ["-o", "cluster_size=16k"]
    if backing:
        (directory / "base.raw").write_bytes(b"\x11" * (4 << 20))
        options += ["-b", "base.raw", "-F", "raw"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", *options, "disk.qed", "4M"],
                   cwd=directory, check=True)
    data = os.urandom(20 * KiB)
    offset = 3 * (1 << 20) + 1000  # no L2 table there yet
    outcomes = set()
    for hold in range(12):
        work = tmp_path / f"hold{hold}"
        shutil.copytree(directory, work)
        path = work / "disk.qed"
        size_before = path.stat().st_size
        node, gate = await open_gated(path, "qed", read_only=False)
        try:
            before = bytes(await node.pread(0, node.size))
            gate.hold_after(hold)
            finished = trio.Event()
            with trio.fail_after(TIMEOUT), trio.CancelScope() as doomed:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_write_then_set, node, offset, data, finished)
                    # Until the write waits in the gate or has finished (it may wait for the
                    # disk a while in between: a sync).
                    while not (gate.held or finished.is_set()):
                        await trio.sleep(0.001)
                    held = gate.held > 0
                    if held:
                        doomed.cancel()
            gate.release()
            assert_nothing_in_flight(node)
            got = bytes(await node.pread(offset, len(data)))
            assert got in (before[offset : offset + len(data)], data), hold
            outcomes.add((held, got == data))
            if held and got != data:
                assert path.stat().st_size == size_before, "the reservation was not cut back"
            view = bytes(await node.pread(0, node.size))
        finally:
            gate.release()  # a failed step must not leave the close waiting in the gate
            await node.aclose()
        assert_clean(path, "qed")
        raw = work / "view.raw"
        raw.write_bytes(view)
        qemu_compare(path, "qed", raw)
    # Every outcome was met: given back, finished later, and not cancelled at all.
    assert outcomes == {(True, False), (True, True), (False, True)}, outcomes
