"""Crash and race scenarios: a workload driven through a :class:`~tests.support.faulty.FaultyFile`
below a format node, and the judgement of what a fresh open reads afterwards.

:class:`CrashModel` keeps what the disk must hold across a crash: the bytes as of the last
completed flush, and the operations since, whose ranges a crash leaves undecided.

- :func:`run_crash`: the power fails after N writes while the driver carries on unaware
  (``CrashMode.DROP``); everything flushed must survive, everything else read old or new.
- :func:`run_power_cut`: the process is killed after N writes (``CrashMode.KILL``), and the
  disk keeps any subset of the writes since the last flush; each byte must read as flushed or
  as one of the values written since. :func:`write_back_crash_points` finds the points inside
  metadata write-backs, where that matters most.
- :func:`run_concurrent`: many writers and readers interleaving; every read sees each byte old
  or new.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from tests.support.faulty import CrashedError, CrashMode, FaultyFile, open_faulty
from tests.support.workload import (
    Operation,
    WorkloadTarget,
    apply_op,
    apply_workload,
    assert_same_as_model,
    disjoint_workload,
    make_block_workload,
    write_reference,
)
from vdiskfs.block.context import OpenContext, open_image
from vdiskfs.block.node import BlockNode

NodeClass = Callable[[BlockNode, OpenContext], BlockNode]


def assert_old_or_new(got: bytes, old: bytes, new: bytes, where: int) -> None:
    """Each byte of ``got`` (read at ``where``) is the old or the new value."""
    if got != old and got != new:
        # Part of a write may have landed (one block in place, the next not yet mapped).
        bad = next((i for i in range(len(got)) if got[i] != old[i] and got[i] != new[i]), None)
        assert bad is None, f"byte {where + bad:#x} is neither the old nor the new value"


class CrashModel:
    """What a disk must hold across a crash: ``model`` (what it holds now), ``flushed`` (as of
    the last completed flush) and ``since`` (the operations after that flush)."""

    def __init__(self, initial: bytes, faulty: FaultyFile | None = None) -> None:
        self.model = bytearray(initial)
        self.flushed = bytes(initial)
        self.since: list[Operation] = []
        #: The filter below the node: a flush completes only if no write was lost before it.
        self.faulty = faulty

    async def apply(self, target: WorkloadTarget, op: Operation) -> None:
        """Run ``op`` against ``target`` and follow it in the model."""
        if op.kind != "flush":
            # Before it runs: an operation cut short by a crash may have landed in part.
            self.since.append(op)
        data = await apply_op(target, op)
        if data is not None:
            self.model[op.offset : op.offset + len(data)] = data
        elif self.faulty is None or not self.faulty.crashed:
            self.flushed_now()

    def flushed_now(self) -> None:
        """Everything so far is durable."""
        self.flushed = bytes(self.model)
        self.since.clear()

    def assert_untouched_kept(self, got: bytes) -> None:
        """Every byte no operation since the last flush touched reads as flushed."""
        untouched = bytearray(b"\1") * len(self.flushed)
        for op in self.since:
            untouched[op.offset : op.offset + op.length] = bytes(op.length)
        for pos in range(0, len(self.flushed), 4096):
            mask = untouched[pos : pos + 4096]
            piece = got[pos : pos + 4096]
            want = self.flushed[pos : pos + 4096]
            if piece != want:
                bad = [i for i, m in enumerate(mask) if m and piece[i] != want[i]]
                assert not bad, f"flushed byte at {pos + bad[0]:#x} lost after the crash"

    def assert_consistent(self, got: bytes) -> None:
        """Bytes untouched since the last flush read as flushed; the others as flushed or new
        (for disjoint operations, where a byte has one new value at most)."""
        assert len(got) == len(self.flushed)
        self.assert_untouched_kept(got)
        for op in self.since:
            start, end = op.offset, op.offset + op.length
            assert_old_or_new(got[start:end], self.flushed[start:end],
                              bytes(self.model[start:end]), start)


async def read_image(path: Path, driver: str) -> bytes:
    """The guest bytes of ``path`` as a fresh open reads them, after checking that the image
    still probes as ``driver``."""
    node = await open_image(str(path))
    try:
        assert node.driver == driver, f"{path} now probes as {node.driver}"
        return bytes(await node.pread(0, node.size))
    finally:
        await node.aclose()


# -- a power cut the driver does not notice -------------------------------------------------------


async def run_crash(path: Path, node_class: NodeClass, *, budget: int, seed: int, unit: int,
                    count: int = 40, warm_up: Path | None = None,
                    stop_at_crash: bool = False) -> tuple[bytes, FaultyFile]:
    """A disjoint workload of ``count`` operations (``unit``: the block size to straddle) on
    ``path``, with the power cut after ``budget`` writes reach the file; then a fresh open
    reads every flushed byte as flushed, and every other as flushed or new. Returns what that
    open read, and the filter (its counts).

    ``warm_up``: the image's raw reference: a random workload of 30 operations from ``seed``
    (applied to the reference too) and a flush come first, the cut is armed only then, and the
    disjoint workload comes from ``seed + 1``. ``stop_at_crash``: the run ends with the
    operation that lost the first write (the node still closes), as a process that stops
    there; otherwise it carries on to the end, flushing and closing, and its own view of the
    disk must stay whole.
    """
    node, faulty = await open_faulty(path, node_class, mode=CrashMode.DROP)
    try:
        if warm_up is not None:
            warm = make_block_workload(node.size, seed=seed, unit=unit, count=30)
            await apply_workload(node, warm, warm_up)
            await node.flush()
            state = CrashModel(warm_up.read_bytes(), faulty)
            seed += 1
        else:
            state = CrashModel(bytes(await node.pread(0, node.size)), faulty)
        faulty.crash_in(budget)
        for op in disjoint_workload(node.size, seed=seed, unit=unit, count=count):
            await state.apply(node, op)
            if stop_at_crash and faulty.crashed:
                break
        if not stop_at_crash:
            assert await node.pread(0, node.size) == state.model  # the driver's view is whole
    finally:
        await node.aclose()  # its write-back goes through the power cut too
    if not faulty.crashed:
        state.flushed_now()  # the close's write-back made the rest durable
    got = await read_image(path, node.driver)
    state.assert_consistent(got)
    return got, faulty


# -- a killed process and a disk that keeps any subset of the writes since the last flush ---------


def assert_one_of(got: bytes, snapshots: Sequence[bytes], chunk: int = 4096) -> None:
    """Every byte of ``got`` equals that byte in one of ``snapshots`` (the disk as of the last
    flush, then after each later operation)."""
    for start in range(0, len(got), chunk):
        piece = got[start : start + chunk]
        if any(piece == s[start : start + chunk] for s in snapshots):
            continue
        for i, value in enumerate(piece):
            if all(s[start + i] != value for s in snapshots):
                raise AssertionError(
                    f"byte {start + i:#x} is neither flushed data nor anything written since")


def _power_cut_workload(size: int, unit: int, seed: int) -> list[Operation]:
    return make_block_workload(size, seed=seed, unit=unit, count=80, flush_every=4)


async def write_back_crash_points(path: Path, node_class: NodeClass, *, size: int, unit: int,
                                  seed: int) -> list[int]:
    """Crash points inside metadata write-backs: the workload of :func:`run_power_cut` runs
    on a copy of ``path`` without a crash, and for every flush that wrote at least two
    things, the point just after its first write is returned (a power cut between a table
    and what it names is what the flushes inside a write-back guard against)."""
    dry = path.with_name(f"dry{path.suffix}")
    dry.write_bytes(path.read_bytes())
    points: list[int] = []
    try:
        node, faulty = await open_faulty(dry, node_class)
        try:
            for op in _power_cut_workload(size, unit, seed):
                before = faulty.writes
                await apply_op(node, op)
                if op.kind == "flush" and faulty.writes - before >= 2:
                    points.append(before + 1)
        finally:
            await node.aclose()
    finally:
        dry.unlink()
    return points


async def run_power_cut(path: Path, node_class: NodeClass, *, crash_after: int, size: int,
                        unit: int, seed: int, images: int = 4,
                        qemu_fmt: str | None = None) -> list[Path]:
    """A workload through a :class:`~tests.support.faulty.FaultyFile` until its
    ``crash_after``-th write fails; then ``images`` files a disk could hold after a power cut
    there (flushed bytes and any subset of the later writes, in order) are written beside
    ``path`` and each checked: it opens, everything flushed by the last completed ``flush()``
    is intact, the rest holds old or newly written bytes; QEMU (``qemu_fmt``) reads each as
    vdiskfs does. Returns the crashed images for format checks."""
    node, faulty = await open_faulty(path, node_class, crash_after=crash_after)
    model = bytearray()
    snapshots: list[bytes] = []
    try:
        model = bytearray(await node.pread(0, node.size))
        snapshots = [bytes(model)]
        for op in _power_cut_workload(size, unit, seed):
            try:
                await apply_op(node, op)
            except CrashedError:
                break
            if op.kind == "flush":
                snapshots = [bytes(model)]
            else:
                model[op.offset : op.offset + op.length] = op.data()
                snapshots.append(bytes(model))
        # The operation in flight when the power went may have landed in part.
        if op.kind != "flush":
            model[op.offset : op.offset + op.length] = op.data()
            snapshots.append(bytes(model))
    finally:
        # Its write-back cannot reach the dead disk.
        with contextlib.suppress(CrashedError):
            await node.aclose()
    assert faulty.crashed, "the workload ended before the crash point"
    rng = random.Random(seed)
    crashed: list[Path] = []
    for i in range(images):
        image = path.with_name(f"crashed{i}{path.suffix}")
        image.write_bytes(faulty.crash_image(rng, keep=(0.0, 0.3, 0.7, 1.0)[i % 4]))
        got = await read_image(image, node.driver)
        assert_one_of(got, snapshots)
        if qemu_fmt is not None:
            assert_same_as_model(image, qemu_fmt, got, path.with_name(f"crashed{i}.raw"))
        crashed.append(image)
    return crashed


# -- concurrency ----------------------------------------------------------------------------------


async def run_concurrent(path: Path, reference: Path, node_class: NodeClass, *, size: int,
                         unit: int, seed: int) -> None:
    """Disjoint writes and zero requests from many tasks at once, readers among them, over a
    file that yields before every request (so that they really interleave): every read sees
    each byte old or new. The reference is updated to what the disk must hold."""
    old = reference.read_bytes()
    ops = disjoint_workload(size, seed=seed, unit=unit, count=40)
    new = bytearray(old)
    for op in ops:
        if op.kind != "flush":
            new[op.offset : op.offset + op.length] = op.data()
    rng = random.Random(seed)
    node, _faulty = await open_faulty(path, node_class, jitter=1.0)
    try:

        async def reader() -> None:
            for _ in range(15):
                offset = rng.randrange(0, size)
                length = min(size - offset, rng.randrange(1, 3 * unit))
                got = bytes(await node.pread(offset, length))
                assert_old_or_new(got, old[offset : offset + length],
                                  bytes(new[offset : offset + length]), offset)

        async with trio.open_nursery() as nursery:
            for op in ops:
                nursery.start_soon(apply_op, node, op)
            for _ in range(6):
                nursery.start_soon(reader)
    finally:
        await node.aclose()
    for op in ops:
        if op.kind != "flush":
            write_reference(reference, op.offset, op.data())
