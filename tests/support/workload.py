"""Deterministic random write workloads, applied to anything that writes like a block node, with
a raw model of what the disk must hold afterwards; and the reference tools' verdicts on the
result (``qemu-img check``, ``qemu-img compare``).

Two generators, each fixed for its seed (crash tests name the write counts at which their
workloads cut the power, so a generator never changes what it yields for a seed):

- :func:`make_workload` (the qcow2 tests): unaligned writes, writes across cluster boundaries,
  large writes, buffers of zeros, zero requests that may unmap, discards, writes to the partial
  last cluster, the same cluster over and over, flushes; ``hot_spots`` to aim at.
- :func:`make_block_workload` (the vmdk, vpc, vhdx, vdi and qed tests): writes and zero
  requests straddling the grain or block boundaries of ``unit``, writes ending at the disk's
  last byte, buffers of zeros, flushes; ``hot`` windows to concentrate them in.
- :func:`make_discard_workload` (discard and write-zeroes tests): as many discards and zero
  requests as writes, aligned to clusters and subclusters or not.

:func:`disjoint_workload` makes operations that never overlap (for crash tests, where each byte
must read as its old value or the one later write to it).

:func:`apply_workload` runs operations against a :class:`WorkloadTarget` (a
:class:`~vdiskfs.block.node.BlockNode`, or an adapter around a file of the FUSE mount) and keeps
a model equal to what the target must read back: a ``bytearray``, or a raw reference file for
disks too large to hold in memory. A discard leaves its range unspecified, so the model takes
what the target reads there right after it; ``qemu-img compare`` against the model then checks
that QEMU reads the same.

Then the verdicts: :func:`assert_image_matches` (a fresh open reads the model),
:func:`assert_use_changes_nothing` (reading, and a writable open without writes, leave the files
as they were), and QEMU's -- :func:`qemu_check` and :func:`assert_clean`, :func:`qemu_compare`
and :func:`assert_same_as_model`, run in the image's directory. :func:`run_workload_checked` and
:func:`write_racing` are a whole write test in one call: write, close, and check it all.
Crash and race scenarios built on these are in :mod:`tests.support.crash`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from tests.support.images import QEMU_IMG, sha256_file
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode

KiB = 1024
MiB = 1024 * KiB


class WorkloadTarget(Protocol):
    size: int

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def pwrite(self, offset: int, data: bytes) -> None: ...

    async def zero(self, offset: int, length: int, *, may_unmap: bool = False) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Operation:
    """One request of a workload."""

    #: "write", "zero", "discard" or "flush".
    kind: str
    offset: int = 0
    length: int = 0
    #: For writes without a ``payload``: the seed of the data, or None for a buffer of zeros.
    seed: int | None = None
    may_unmap: bool = False
    #: For writes: the data itself (a test's own write, or a generator that draws the bytes
    #: from its own random stream).
    payload: bytes | None = None

    @classmethod
    def write(cls, offset: int, data: bytes) -> Operation:
        return cls("write", offset, len(data), payload=bytes(data))

    def data(self) -> bytes:
        """What a write or zero request leaves in its range."""
        if self.payload is not None:
            return self.payload
        if self.seed is None:
            return bytes(self.length)
        return random.Random(self.seed).randbytes(self.length)


# -- generators -----------------------------------------------------------------------------------


def make_workload(size: int, seed: int, *, count: int = 160, cluster_size: int = 64 * KiB,
                  flush_every: int = 25, large: int = 1 * MiB,
                  hot_spots: tuple[int, ...] = ()) -> list[Operation]:
    """``count`` operations over a disk of ``size`` bytes, the same for the same arguments.

    ``hot_spots``: guest offsets worth hitting on purpose (compressed clusters, backing data,
    zero clusters of the image under test); writes land on and around them often.
    """
    rng = random.Random(seed)
    ops: list[Operation] = []

    def clip(offset: int, length: int) -> tuple[int, int]:
        offset = max(0, min(offset, size - 1))
        return offset, max(1, min(length, size - offset))

    for i in range(count):
        choice = rng.random()
        spot = rng.choice(hot_spots) if hot_spots and rng.random() < 0.3 else None
        if choice < 0.25:  # small and unaligned
            base = spot if spot is not None else rng.randrange(size)
            offset, length = clip(base + rng.randrange(-3000, 3000), rng.randrange(1, 9000))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        elif choice < 0.45:  # across a cluster boundary
            boundary = (rng.randrange(size) // cluster_size + 1) * cluster_size
            offset, length = clip(boundary - rng.randrange(1, 5000),
                                  rng.randrange(2, 2 * cluster_size + 9000))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        elif choice < 0.55:  # large
            offset, length = clip(rng.randrange(size),
                                  rng.randrange(cluster_size, max(large, 2 * cluster_size)))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        elif choice < 0.65:  # zeros written as data: whole clusters, and not
            if rng.random() < 0.5:
                offset = rng.randrange(size) // cluster_size * cluster_size
                offset, length = clip(offset, cluster_size * rng.randrange(1, 4))
            else:
                offset, length = clip(rng.randrange(size), rng.randrange(1, 3 * cluster_size))
            ops.append(Operation("write", offset, length, seed=None))
        elif choice < 0.73:  # zero requests
            offset, length = clip(rng.randrange(size), rng.randrange(1, 4 * cluster_size))
            ops.append(Operation("zero", offset, length, may_unmap=rng.random() < 0.5))
        elif choice < 0.77:  # discard
            offset, length = clip(rng.randrange(size), rng.randrange(1, 4 * cluster_size))
            ops.append(Operation("discard", offset, length))
        elif choice < 0.87:  # the end of the disk, with its partial last cluster
            offset, length = clip(size - rng.randrange(1, 2 * cluster_size + 1), size)
            ops.append(Operation("write", offset, length,
                                 seed=None if rng.random() < 0.2 else rng.randrange(1 << 30)))
        else:  # the same cluster again and again
            hot = (spot if spot is not None else (seed * 7919) % size) // cluster_size
            offset, length = clip(hot * cluster_size + rng.randrange(cluster_size),
                                  rng.randrange(1, cluster_size))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        if flush_every and i % flush_every == flush_every - 1:
            ops.append(Operation("flush"))
    ops.append(Operation("flush"))
    return ops


def make_block_workload(size: int, *, seed: int, unit: int, count: int = 120,
                        hot: Sequence[tuple[int, int]] = (), max_length: int = 300_000,
                        flush_every: int = 40) -> list[Operation]:
    """``count`` operations over a disk of ``size`` bytes; ``unit`` is the grain or block size
    whose boundaries the writes should straddle; ``hot``: ``(start, end)`` windows that get
    as many writes as the rest of the disk (around the 2 GiB boundary of a split image, over a
    region without a grain table); a flush after about every ``flush_every`` operations.
    Several MiB in all."""
    rng = random.Random(seed)
    windows = [(0, size), *hot]
    ops: list[Operation] = []

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
            ops.append(Operation("zero", offset, length))
            continue
        else:
            length = rng.randrange(1, max_length)
            offset = place(length)
            length = min(length, size - offset)
            ops.append(Operation("write", offset, length))  # a buffer of zeros
            continue
        length = max(1, min(length, size - offset))
        ops.append(Operation("write", offset, length, payload=rng.randbytes(length)))
        if i % flush_every == flush_every - 1:
            ops.append(Operation("flush"))
    return ops


def make_discard_workload(size: int, seed: int, *, cluster_size: int, count: int = 24,
                          flush_every: int = 4, subcluster: int | None = None
                          ) -> list[Operation]:
    """``count`` operations that unmap as much as they write: discards and zero requests
    (unmapping or not) over whole clusters, whole subclusters (``subcluster``), unaligned
    ranges and the disk's partial last cluster, between writes and buffers of zeros that
    reuse what they free; a flush after every ``flush_every``. The same for the same
    arguments."""
    rng = random.Random(seed)
    unit = subcluster or cluster_size
    ops: list[Operation] = []

    def span() -> tuple[int, int]:
        shape = rng.random()
        if shape < 0.45:  # whole clusters
            offset = rng.randrange(-(-size // cluster_size)) * cluster_size
            length = cluster_size * rng.randrange(1, 4)
        elif shape < 0.6:  # whole subclusters, or pieces of one cluster
            offset = rng.randrange(size // unit) * unit
            length = unit * rng.randrange(1, 4)
        elif shape < 0.85:  # unaligned, across boundaries
            offset = rng.randrange(size)
            length = rng.randrange(1, 3 * cluster_size)
        else:  # up to the end of the disk
            offset = size - rng.randrange(1, 2 * cluster_size)
            length = size
        offset = max(0, min(offset, size - 1))
        return offset, max(1, min(length, size - offset))

    for i in range(count):
        choice = rng.random()
        offset, length = span()
        if choice < 0.3:
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        elif choice < 0.4:
            ops.append(Operation("write", offset, length, seed=None))
        elif choice < 0.7:
            ops.append(Operation("zero", offset, length, may_unmap=rng.random() < 0.5))
        else:
            ops.append(Operation("discard", offset, length))
        if flush_every and i % flush_every == flush_every - 1:
            ops.append(Operation("flush"))
    ops.append(Operation("flush"))
    return ops


def disjoint_workload(size: int, *, seed: int, unit: int, count: int) -> list[Operation]:
    """Writes and zero requests that never overlap one another, with flushes among them."""
    rng = random.Random(seed)
    taken: list[tuple[int, int]] = []
    ops: list[Operation] = []
    while len(ops) < count:
        length = rng.choice((rng.randrange(1, 3000), rng.randrange(1, 2 * unit)))
        offset = rng.randrange(0, size - length)
        if any(offset < end and start < offset + length for start, end in taken):
            continue
        taken.append((offset, offset + length))
        if rng.random() < 0.15:
            ops.append(Operation("zero", offset, length))
        else:
            ops.append(Operation("write", offset, length, payload=rng.randbytes(length)))
        if rng.random() < 0.2:
            ops.append(Operation("flush"))
    return ops


def written_bytes(ops: Sequence[Operation]) -> int:
    """Bytes written or zeroed by ``ops``."""
    return sum(op.length for op in ops if op.kind in ("write", "zero"))


def touched_ranges(ops: Sequence[Operation], size: int, margin: int) -> list[tuple[int, int]]:
    """The ranges the operations changed, widened by ``margin`` (a grain's copy-on-write)."""
    return [(max(0, op.offset - margin), min(size, op.offset + op.length + margin))
            for op in ops if op.kind != "flush"]


# -- applying them --------------------------------------------------------------------------------


async def apply_op(target: WorkloadTarget, op: Operation) -> bytes | None:
    """Run ``op`` against ``target``; return what its range must read as now (None for a
    flush). A discarded range reads unspecified: what the target reads there right after."""
    if op.kind == "write":
        data = op.data()
        await target.pwrite(op.offset, data)
        return data
    if op.kind == "zero":
        await target.zero(op.offset, op.length, may_unmap=op.may_unmap)
        return bytes(op.length)
    if op.kind == "discard":
        await target.discard(op.offset, op.length)
        return bytes(await target.pread(op.offset, op.length))
    if op.kind == "flush":
        await target.flush()
        return None
    raise ValueError(f"unknown operation {op.kind!r}")


def write_reference(reference: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into a raw reference file (sparse: only written ranges take space)."""
    with open(reference, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


async def apply_workload(target: WorkloadTarget, ops: Sequence[Operation],
                         model: bytearray | Path, *,
                         after: Callable[[int, Operation], Awaitable[None]] | None = None
                         ) -> int:
    """Run ``ops`` against ``target``, keeping ``model`` (in memory, or a raw reference file)
    what the target must hold; returns the bytes written and zeroed.

    ``after(i, op)`` runs after each operation that succeeded (a test that records the model
    at each flush, say).
    """
    for i, op in enumerate(ops):
        data = await apply_op(target, op)
        if data is not None:
            if isinstance(model, bytearray):
                model[op.offset : op.offset + len(data)] = data
            else:
                write_reference(model, op.offset, data)
        if after is not None:
            await after(i, op)
    return written_bytes(ops)


# -- checking the result --------------------------------------------------------------------------


async def assert_reads_match(node: WorkloadTarget, reference: Path,
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


async def assert_image_matches(path: Path, reference: Path,
                               ranges: Sequence[tuple[int, int]] | None = None) -> None:
    """A fresh read-only open of ``path`` reads as the reference file (or over ``ranges``)."""
    node = await open_image(str(path))
    try:
        await assert_reads_match(node, reference, ranges)
    finally:
        await node.aclose()


async def assert_use_changes_nothing(
        path: Path, *, writable: bool = False, fmt: str | None = None,
        files: Sequence[Path] | None = None,
        also: Callable[[BlockNode], Awaitable[None]] | None = None) -> None:
    """Open ``path`` (read-only, or writable; ``fmt`` forced or probed) and use it as a reader
    does -- read the whole disk, ask for its block status, flush (``also``: one more step of
    the test's own) -- then close it: ``files`` (by default the image alone) keep every byte."""
    files = [path] if files is None else list(files)
    before = [sha256_file(f) for f in files]
    node = await open_image(str(path), OpenOptions(read_only=not writable, format=fmt))
    try:
        await node.pread(0, node.size)
        await node.block_status(0, node.size)
        if also is not None:
            await also(node)
        await node.flush()
    finally:
        await node.aclose()
    assert [sha256_file(f) for f in files] == before


# -- the reference tools' verdicts ----------------------------------------------------------------


def _qemu_img(image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``qemu-img ARGS``, run in the directory of ``image`` (QEMU 7.2 resolves a relative
    external data file name against the working directory)."""
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, cwd=image.parent)


def qemu_check(image: str | os.PathLike[str], fmt: str, *extra: str) -> dict[str, Any]:
    """``qemu-img check --output=json`` (exit 0, 2 for corruptions, 3 for leaks), with its
    ``returncode`` and ``stderr`` added; ``extra``: ``-U`` while vdiskfs holds the image,
    ``-r all`` to repair."""
    path = Path(image).resolve()
    proc = _qemu_img(path, "check", "-f", fmt, "--output=json", *extra, str(path))
    assert proc.returncode in (0, 2, 3) and proc.stdout.strip(), (
        f"qemu-img check {image} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    report: dict[str, Any] = json.loads(proc.stdout)
    report["returncode"] = proc.returncode
    report["stderr"] = proc.stderr
    return report


def assert_clean(image: str | os.PathLike[str], fmt: str, *extra: str,
                 leaks_allowed: bool = False) -> None:
    """No corruption, no check error and (unless allowed) no leak."""
    report = qemu_check(image, fmt, *extra)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    if not leaks_allowed:
        assert report.get("leaks", 0) == 0, report
        assert report["returncode"] == 0, report


def qemu_repaired_copy(image: Path, fmt: str,
                       accept: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of ``image`` after ``qemu-img check -r all`` (which replays a vhdx log, repairs
    a qed image); ``accept`` judges the repair's report."""
    copy = image.with_name(image.name + ".repaired")
    shutil.copyfile(image, copy)
    report = qemu_check(copy, fmt, "-r", "all")
    if accept is not None:
        accept(report)
    return copy


def qemu_compare(image: str | os.PathLike[str], fmt: str, raw: str | os.PathLike[str]) -> None:
    """``qemu-img compare`` of the image (as QEMU reads it) against a raw file."""
    path = Path(image).resolve()
    proc = _qemu_img(path, "compare", "-f", fmt, "-F", "raw", str(path),
                     str(Path(raw).resolve()))
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"


def assert_qemu_agrees(image: str | os.PathLike[str], fmt: str,
                       reference: str | os.PathLike[str]) -> None:
    """``qemu-img check`` finds nothing wrong, and QEMU reads the raw ``reference``."""
    assert_clean(image, fmt)
    qemu_compare(image, fmt, reference)


def assert_same_as_model(image: str | os.PathLike[str], fmt: str, model: bytes | bytearray,
                         scratch: str | os.PathLike[str]) -> None:
    """``qemu-img compare`` of the image against the raw ``model``, written to ``scratch``."""
    Path(scratch).write_bytes(model)
    qemu_compare(image, fmt, scratch)


# -- a write test in one call ---------------------------------------------------------------------


async def run_workload_checked(path: Path, fmt: str, ops: Sequence[Operation],
                               reference: Path, *, qemu_check: bool = True,
                               qemu_reads: bool = True) -> BlockNode:
    """Open ``path`` writable as ``fmt``, run ``ops`` (several MiB of writes) against it and
    its raw ``reference``, close it; then ``qemu-img check`` finds nothing wrong (unless QEMU
    cannot check the format), QEMU reads the reference (unless it cannot read the image) and
    so does a fresh open. Returns the closed node, for its counters."""
    node = await open_image(str(path), OpenOptions(read_only=False, format=fmt))
    try:
        assert node.size == reference.stat().st_size
        written = await apply_workload(node, ops, reference)
    finally:
        await node.aclose()
    assert written > 4 * MiB
    if qemu_check:
        assert_clean(path, fmt)
    if qemu_reads:
        qemu_compare(path, fmt, reference)
    await assert_image_matches(path, reference)
    return node


async def write_racing(path: Path, fmt: str, pieces: Sequence[tuple[int, bytes]],
                       reference: Path) -> BlockNode:
    """Open ``path`` writable, write each ``(offset, data)`` of ``pieces`` from a task of its
    own, all at once, and close it; then QEMU finds it clean and reading as ``reference`` with
    the pieces written. Returns the closed node, for its counters."""
    node = await open_image(str(path), OpenOptions(read_only=False, format=fmt))
    try:
        async with trio.open_nursery() as nursery:
            for offset, data in pieces:
                nursery.start_soon(node.pwrite, offset, data)
    finally:
        await node.aclose()
    for offset, data in pieces:
        write_reference(reference, offset, data)
    assert_qemu_agrees(path, fmt, reference)
    return node
