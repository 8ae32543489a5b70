"""A deterministic random write workload for format drivers, applied to a node and to a raw
reference file alike, and the checks that follow it (the writes issue's workload).

The operations are what catches allocation bugs: unaligned offsets and lengths, writes across
grain/block boundaries and across grain tables, buffers of zeros, write-zeroes requests (whole
and partial grains), writes ending at the disk's last byte (its partial last grain or block),
and several MiB in all. ``hot`` windows concentrate writes where a test wants them (around the
2 GiB boundary of a split image, over a region without a grain table).

Also here: :func:`run_crash` (a power cut after N writes, then "flushed data intact, the rest
old or new") and :func:`run_concurrent` (many writers and readers interleaving).

(The write tests of several formats share this module; it can move to ``tests/support`` once a
shared workload exists there.)
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.support.images import QEMU_IMG, run
from vdiskfs.block.node import BlockNode, Buffer, FilterNode
from vdiskfs.block.registry import OpenContext, OpenOptions, open_image
from vdiskfs.drivers.protocol.file import FileNode


@dataclass(frozen=True)
class Op:
    """``write`` (``data``) or ``zero`` (``length`` bytes) at ``offset``."""

    kind: str
    offset: int
    length: int
    data: bytes = b""


def make_workload(size: int, *, seed: int, unit: int, count: int = 120,
                  hot: Sequence[tuple[int, int]] = (), max_length: int = 300_000,
                  flush_every: int = 40) -> list[Op]:
    """``count`` operations over a disk of ``size`` bytes; ``unit`` is the grain or block size
    whose boundaries the writes should straddle; a flush after every ``flush_every``."""
    rng = random.Random(seed)
    windows = [(0, size), *hot]
    ops: list[Op] = []

    def place(length: int) -> int:
        start, end = windows[rng.randrange(len(windows))] if hot else windows[0]
        end = min(end, size)
        return rng.randrange(start, max(start + 1, end - length))

    for i in range(count):
        shape = rng.random()
        if shape < 0.35:
            length = rng.randrange(1, 5000)  # small, unaligned
            offset = place(length)
        elif shape < 0.55:
            # Across a unit boundary, starting a few bytes before it.
            boundary = rng.randrange(1, max(2, size // unit)) * unit
            offset = min(size - 1, max(0, boundary - rng.randrange(1, 3000)))
            length = rng.randrange(1, unit + 5000)
        elif shape < 0.8:
            length = rng.randrange(5000, max_length)
            offset = place(length)
        elif shape < 0.85:
            # The disk's last bytes: its partial last grain or block.
            length = rng.randrange(1, min(size, 3 * unit))
            offset = size - length
        elif shape < 0.93:
            # Write-zeroes: whole units (zeroed grains, holes) or unaligned.
            length = rng.choice((unit, 2 * unit, rng.randrange(1, 2 * unit)))
            offset = place(length) // unit * unit if rng.random() < 0.6 else place(length)
            length = min(length, size - offset)
            ops.append(Op("zero", offset, length))
            continue
        else:
            length = rng.randrange(1, max_length)
            offset = place(length)
            length = min(length, size - offset)
            ops.append(Op("write", offset, length, bytes(length)))  # a buffer of zeros
            continue
        length = max(1, min(length, size - offset))
        ops.append(Op("write", offset, length, rng.randbytes(length)))
        if i % flush_every == flush_every - 1:
            ops.append(Op("flush", 0, 0))
    return ops


def disjoint_workload(size: int, *, seed: int, unit: int, count: int) -> list[Op]:
    """Writes and zeroes that never overlap one another (for crash tests, where each byte must
    read as its old value or the one later write to it), with flushes among them."""
    rng = random.Random(seed)
    taken: list[tuple[int, int]] = []
    ops: list[Op] = []
    while len(ops) < count:
        length = rng.choice((rng.randrange(1, 3000), rng.randrange(1, 2 * unit)))
        offset = rng.randrange(0, size - length)
        if any(offset < end and start < offset + length for start, end in taken):
            continue
        taken.append((offset, offset + length))
        if rng.random() < 0.15:
            ops.append(Op("zero", offset, length))
        else:
            ops.append(Op("write", offset, length, rng.randbytes(length)))
        if rng.random() < 0.2:
            ops.append(Op("flush", 0, 0))
    return ops


async def apply_op(node: BlockNode, op: Op) -> None:
    if op.kind == "write":
        await node.pwrite(op.offset, op.data)
    elif op.kind == "zero":
        await node.zero(op.offset, op.length)
    else:
        await node.flush()


def apply_to_reference(reference: Path, op: Op) -> None:
    """Apply ``op`` to a raw file (sparse: only written ranges take space)."""
    if op.kind == "flush":
        return
    data = op.data if op.kind == "write" else bytes(op.length)
    with open(reference, "r+b") as f:
        os.pwrite(f.fileno(), data, op.offset)


async def apply_workload(node: BlockNode, ops: Sequence[Op], reference: Path) -> int:
    """Apply ``ops`` to ``node`` and to the raw ``reference``; returns the bytes written."""
    total = 0
    for op in ops:
        await apply_op(node, op)
        apply_to_reference(reference, op)
        total += op.length
    return total


def touched_ranges(ops: Sequence[Op], size: int, margin: int) -> list[tuple[int, int]]:
    """The ranges the operations wrote, widened by ``margin`` (a grain's copy-on-write)."""
    return [(max(0, op.offset - margin), min(size, op.offset + op.length + margin))
            for op in ops if op.kind != "flush"]


async def assert_reads_match(node: BlockNode, reference: Path,
                             ranges: Sequence[tuple[int, int]] | None = None) -> None:
    """Our reading of ``node`` equals the reference file, whole or over ``ranges``."""
    if ranges is None:
        ranges = [(start, min(node.size, start + (4 << 20)))
                  for start in range(0, node.size, 4 << 20)]
    with open(reference, "rb") as f:
        for start, end in ranges:
            got = bytes(await node.pread(start, end - start))
            want = os.pread(f.fileno(), end - start, start)
            assert got == want, f"mismatch in {start:#x}-{end:#x}"


def qemu_check(image: Path, fmt: str) -> str:
    """``qemu-img check``: must report no errors (leaked clusters are allowed by callers)."""
    proc = run(QEMU_IMG, "check", "-f", fmt, image, check=False)
    assert proc.returncode == 0, f"qemu-img check failed:\n{proc.stdout}\n{proc.stderr}"
    assert "No errors were found" in proc.stdout, proc.stdout
    return proc.stdout


def qemu_compare(image: Path, fmt: str, reference: Path) -> None:
    proc = run(QEMU_IMG, "compare", "-f", fmt, "-F", "raw", image, reference, check=False)
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"


# -- crash simulation ---------------------------------------------------------------------------


class CrashAfter(FilterNode):
    """Between a format node and its file: lets ``budget`` writes through and silently drops
    every later one, as a disk does when the power fails -- the writes after the crash never
    happened, though the driver saw them succeed. ``budget`` None: no crash yet."""

    def __init__(self, child: BlockNode) -> None:
        super().__init__(child)
        self.growable = child.growable
        self.budget: int | None = None
        self.dropped = 0

    def _take(self) -> bool:
        if self.budget is None:
            return True
        if self.budget > 0:
            self.budget -= 1
            return True
        self.dropped += 1
        return False

    def _grow(self, end: int) -> None:
        self.size = max(self.size, end)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        if self._take():
            await self.file.pwrite(offset, data)
        self._grow(offset + len(data))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        if self._take():
            await self.file.zero(offset, length, may_unmap=may_unmap)
        self._grow(offset + length)


async def _open_through_crash_filter(path: Path, node_class: type) -> tuple[BlockNode,
                                                                            CrashAfter]:
    file = FileNode(str(path), read_only=False)
    await file.open()
    crash = CrashAfter(file)
    await crash.open()
    node = node_class(crash, OpenContext(OpenOptions(read_only=False), path=str(path)))
    try:
        await node.open()
    except BaseException:
        await node.aclose()
        raise
    return node, crash


def assert_crash_consistent(got: bytes, durable: bytes, later: Sequence[Op]) -> None:
    """Bytes no later operation touched read as flushed; the others as flushed or new."""
    new = bytearray(durable)
    for op in later:
        if op.kind != "flush":
            new[op.offset : op.offset + op.length] = op.data or bytes(op.length)
    touched = sorted((op.offset, op.offset + op.length) for op in later if op.kind != "flush")
    position = 0
    for start, end in [*touched, (len(durable), len(durable))]:
        assert got[position:start] == durable[position:start], (
            f"flushed data changed in {position:#x}-{start:#x}")
        g, d, n = got[start:end], durable[start:end], new[start:end]
        if g != d and g != n:
            bad = [i for i in range(len(g)) if g[i] != d[i] and g[i] != n[i]]
            assert not bad, f"byte {start + bad[0]:#x} is neither the old nor the new value"
        position = max(position, end)


async def run_crash(path: Path, reference: Path, node_class: type, *, budget: int, size: int,
                    unit: int, seed: int, qemu_reads: bool = True) -> None:
    """Phase A (no crash) ends with a flush; phase B crashes after ``budget`` writes reach the
    file. Then: everything flushed is intact, the rest is old or new; and QEMU (where it reads
    the image) reads what vdiskfs reads."""
    node, crash = await _open_through_crash_filter(path, node_class)
    try:
        for op in make_workload(size, seed=seed, unit=unit, count=30):
            await apply_op(node, op)
            apply_to_reference(reference, op)
        await node.flush()
        durable = bytearray(reference.read_bytes())
        crash.budget = budget
        later: list[Op] = []
        for op in disjoint_workload(size, seed=seed + 1, unit=unit, count=25):
            await apply_op(node, op)
            if crash.dropped:
                later.append(op)
                break
            if op.kind == "flush":
                # Completed before the crash: everything so far is durable.
                for done in later:
                    if done.kind != "flush":
                        durable[done.offset : done.offset + done.length] = (
                            done.data or bytes(done.length))
                later = []
            else:
                later.append(op)
    finally:
        await node.aclose()  # its write-back is dropped too, once crashed
    reopened = await open_image(str(path))
    try:
        got = bytes(await reopened.pread(0, reopened.size))
    finally:
        await reopened.aclose()
    assert_crash_consistent(got, bytes(durable), later)
    if qemu_reads:
        ours = reference.with_name("ours.raw")
        ours.write_bytes(got)
        qemu_compare(path, node_class.driver, ours)


# -- concurrency --------------------------------------------------------------------------------


class Yielding(FilterNode):
    """Between a format node and its file: yields to other tasks before every request, so
    concurrent requests really interleave (the file driver itself never does)."""

    def __init__(self, child: BlockNode) -> None:
        super().__init__(child)
        self.growable = child.growable

    async def _pread(self, offset: int, length: int) -> Buffer:
        await trio.sleep(0)
        return await self.file.pread(offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await trio.sleep(0)
        await self.file.pwrite(offset, data)
        self.size = max(self.size, offset + len(data))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await trio.sleep(0)
        await self.file.zero(offset, length, may_unmap=may_unmap)
        self.size = max(self.size, offset + length)


def _old_or_new(got: bytes, old: bytes, new: bytes, where: int) -> None:
    if got != old and got != new:
        bad = next(i for i in range(len(got)) if got[i] != old[i] and got[i] != new[i])
        raise AssertionError(f"byte {where + bad:#x} is neither the old nor the new value")


async def run_concurrent(path: Path, reference: Path, node_class: type, *, size: int,
                         unit: int, seed: int) -> None:
    """Disjoint writes and zeroes from many tasks at once, readers among them: every read
    sees each byte old or new, and the result equals the reference."""
    file = FileNode(str(path), read_only=False)
    await file.open()
    yielding = Yielding(file)
    await yielding.open()
    node = node_class(yielding, OpenContext(OpenOptions(read_only=False), path=str(path)))
    old = reference.read_bytes()
    ops = disjoint_workload(size, seed=seed, unit=unit, count=40)
    new = bytearray(old)
    for op in ops:
        if op.kind != "flush":
            new[op.offset : op.offset + op.length] = op.data or bytes(op.length)
    rng = random.Random(seed)
    try:
        await node.open()

        async def reader() -> None:
            for _ in range(15):
                offset = rng.randrange(0, size)
                length = min(size - offset, rng.randrange(1, 3 * unit))
                got = bytes(await node.pread(offset, length))
                _old_or_new(got, old[offset : offset + length], bytes(new[offset : offset
                                                                          + length]), offset)

        async with trio.open_nursery() as nursery:
            for op in ops:
                nursery.start_soon(apply_op, node, op)
            for _ in range(6):
                nursery.start_soon(reader)
    finally:
        await node.aclose()
    for op in ops:
        apply_to_reference(reference, op)


# -- power cut with reordering ------------------------------------------------------------------


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


def _power_cut_workload(size: int, unit: int, seed: int) -> list[Op]:
    return make_workload(size, seed=seed, unit=unit, count=80, flush_every=4)


async def write_back_crash_points(path: Path, node_class: type, *, size: int, unit: int,
                                  seed: int) -> list[int]:
    """Crash points inside metadata write-backs: the workload of :func:`run_power_cut` runs
    on a copy of ``path`` without a crash, and for every flush that wrote at least two
    things, the point just after its first write is returned (a power cut between a table
    and what it names is what the flushes inside a write-back guard against)."""
    from tests.support.faulty import FaultyFile

    dry = path.with_name(f"dry{path.suffix}")
    dry.write_bytes(path.read_bytes())
    file = FileNode(str(dry), read_only=False)
    await file.open()
    faulty = FaultyFile(file)
    await faulty.open()
    node = node_class(faulty, OpenContext(OpenOptions(read_only=False), path=str(dry)))
    points: list[int] = []
    try:
        await node.open()
        for op in _power_cut_workload(size, unit, seed):
            before = faulty.writes
            await apply_op(node, op)
            if op.kind == "flush" and faulty.writes - before >= 2:
                points.append(before + 1)
    finally:
        await node.aclose()
        dry.unlink()
    return points


async def run_power_cut(path: Path, node_class: type, *, crash_after: int, size: int,
                        unit: int, seed: int, images: int = 4,
                        qemu_fmt: str | None = None) -> list[Path]:
    """A workload through :class:`tests.support.faulty.FaultyFile` until its ``crash_after``-th
    write fails; then ``images`` files a disk could hold after a power cut there (flushed
    bytes and any subset of the later writes, in order) are written beside ``path`` and each
    checked: it opens, everything flushed by the last completed ``flush()`` is intact, the
    rest holds old or newly written bytes; QEMU (``qemu_fmt``) reads each as vdiskfs does.
    Returns the crashed images for format checks."""
    from tests.support.faulty import CrashedError, FaultyFile

    file = FileNode(str(path), read_only=False)
    await file.open()
    faulty = FaultyFile(file, crash_after=crash_after)
    await faulty.open()
    node = node_class(faulty, OpenContext(OpenOptions(read_only=False), path=str(path)))
    model = bytearray()
    snapshots: list[bytes] = []
    try:
        await node.open()
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
                model[op.offset : op.offset + op.length] = op.data or bytes(op.length)
                snapshots.append(bytes(model))
        # The operation in flight when the power went may have landed in part.
        if op.kind != "flush":
            model[op.offset : op.offset + op.length] = op.data or bytes(op.length)
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
        reopened = await open_image(str(image))
        try:
            got = bytes(await reopened.pread(0, reopened.size))
        finally:
            await reopened.aclose()
        assert_one_of(got, snapshots)
        if qemu_fmt is not None:
            ours = path.with_name(f"crashed{i}.raw")
            ours.write_bytes(got)
            qemu_compare(image, qemu_fmt, ours)
        crashed.append(image)
    return crashed
