"""Crash simulation and ``qemu-img check`` verdicts for the vdi, qed and vhdx write tests.

:class:`PowerCut` sits between a format node and its file and lets ``budget`` writes reach the
file; every later one is lost, as when the power fails -- but the driver above keeps seeing a
consistent file (the writes land in an in-memory mirror, like a page cache that never reaches
the disk), so it carries on, flushes and closes as it would. :func:`run_crash` drives a
workload through it, tracks what the last *successful* flush made durable, and checks the
file afterwards as a fresh open sees it.

The workload itself is the shared one of ``_write_workload`` (used by the vmdk and vpc write
tests too).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.drivers.format._write_workload import Op, apply_op, disjoint_workload
from tests.support.images import QEMU_IMG, run
from vdiskfs.block.node import BlockNode, Buffer, FilterNode
from vdiskfs.block.registry import OpenContext, OpenOptions, open_image
from vdiskfs.drivers.protocol.file import FileNode


class PowerCut(FilterNode):
    """Lets ``budget`` writes (``pwrite`` or ``zero``) through to the file and drops every later
    one; ``budget`` None: no power cut. Reads are served from a mirror holding every write, so
    the driver's view stays whole. Meant for test images of a few MiB (the mirror is in
    memory)."""

    def __init__(self, child: BlockNode) -> None:
        super().__init__(child)
        self.growable = child.growable
        self.budget: int | None = None
        self.writes = 0
        self.dropped = 0
        self.mirror = bytearray()

    async def open(self) -> None:
        self.size = self.file.size
        self.mirror = bytearray(await self.file.pread(0, self.size)) if self.size else bytearray()

    def _passes(self) -> bool:
        self.writes += 1
        if self.budget is None or self.writes <= self.budget:
            return True
        self.dropped += 1
        return False

    def _paint(self, offset: int, data: Buffer) -> None:
        end = offset + len(data)
        if end > len(self.mirror):
            self.mirror.extend(bytes(end - len(self.mirror)))
        self.mirror[offset:end] = data
        self.size = len(self.mirror)

    async def _pread(self, offset: int, length: int) -> Buffer:
        return bytes(self.mirror[offset : offset + length])

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        if self._passes():
            await self.file.pwrite(offset, data)
        self._paint(offset, bytes(data))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        if self._passes():
            await self.file.zero(offset, length, may_unmap=may_unmap)
        self._paint(offset, bytes(length))

    async def _discard(self, offset: int, length: int) -> None:
        """Advisory: never forwarded, so the file keeps what the mirror keeps."""


async def open_through_power_cut(path: Path, node_class: Any, *,
                                 budget: int | None) -> tuple[BlockNode, PowerCut]:
    """Open ``path`` writable with ``node_class`` over a :class:`PowerCut` of its file."""
    file = FileNode(str(path), read_only=False)
    await file.open()
    cut = PowerCut(file)
    await cut.open()
    node = node_class(cut, OpenContext(OpenOptions(read_only=False), path=str(path)))
    try:
        await node.open()
    except BaseException:
        await node.aclose()
        raise
    cut.budget = None if budget is None else cut.writes + budget
    return node, cut


def apply_to_model(model: bytearray, op: Op) -> None:
    if op.kind != "flush":
        model[op.offset : op.offset + op.length] = op.data or bytes(op.length)


def assert_crash_consistent(got: bytes, durable: bytes, later: Sequence[Op]) -> None:
    """Bytes no later operation touched read as flushed; the others as flushed or new (the
    operations are disjoint, so a byte has one new value at most)."""
    assert len(got) == len(durable)
    new = bytearray(durable)
    for op in later:
        apply_to_model(new, op)
    position = 0
    touched = sorted((op.offset, op.offset + op.length) for op in later if op.kind != "flush")
    for start, end in [*touched, (len(durable), len(durable))]:
        assert got[position:start] == durable[position:start], (
            f"flushed data changed in {position:#x}-{start:#x}")
        piece, old, fresh = got[start:end], durable[start:end], new[start:end]
        if piece != old and piece != fresh:
            # Part of a write may have landed (one block in place, the next not yet mapped).
            bad = next((i for i in range(len(piece)) if piece[i] not in (old[i], fresh[i])),
                       None)
            assert bad is None, (f"byte {start + bad:#x} is neither the flushed nor the new "
                                 "value")
        position = max(position, end)


async def run_crash(path: Path, node_class: Any, *, budget: int, seed: int, unit: int,
                    count: int = 40) -> tuple[bytes, PowerCut]:
    """Apply a disjoint workload (with flushes) to ``path`` through a power cut after
    ``budget`` writes, close, and check that a fresh read-only open of what reached the file
    reads every flushed byte. Returns what that open read, and the power cut (its counts)."""
    node, cut = await open_through_power_cut(path, node_class, budget=budget)
    durable = bytearray(await node.pread(0, node.size))
    model = bytearray(durable)
    later: list[Op] = []
    try:
        for op in disjoint_workload(node.size, seed=seed, unit=unit, count=count):
            await apply_op(node, op)
            apply_to_model(model, op)
            if op.kind == "flush" and not cut.dropped:
                # Completed with every write on the file: all of it is durable.
                durable[:] = model
                later = []
            elif op.kind != "flush":
                later.append(op)
        assert await node.pread(0, node.size) == model  # the driver's own view is whole
    finally:
        await node.aclose()  # its write-back goes through the power cut too
    if not cut.dropped:
        durable[:] = model  # the close's write-back made the rest durable
        later = []
    reopened = await open_image(str(path), OpenOptions(format=node_class.driver))
    try:
        got = bytes(await reopened.pread(0, reopened.size))
    finally:
        await reopened.aclose()
    assert_crash_consistent(got, bytes(durable), later)
    return got, cut


def qemu_check_json(image: Path, fmt: str, *extra: str) -> dict[str, Any]:
    """``qemu-img check --output=json`` (exit 0, 2 corruptions, 3 leaks), with stderr."""
    proc = run(QEMU_IMG, "check", "-f", fmt, "--output=json", *extra, image, check=False)
    assert proc.returncode in (0, 2, 3), f"qemu-img check failed:\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout)
    result["stderr"] = proc.stderr
    result["returncode"] = proc.returncode
    return result


def assert_clean(image: Path, fmt: str, *extra: str) -> None:
    """No corruption, no leak, no check error (``-U``: while vdiskfs holds the image)."""
    result = qemu_check_json(image, fmt, *extra)
    problems = {key: result.get(key, 0) for key in ("corruptions", "leaks", "check-errors")}
    assert problems == {"corruptions": 0, "leaks": 0, "check-errors": 0}, result
    assert result["returncode"] == 0, result


def qemu_compare_raw(image: Path, fmt: str, raw: Path) -> None:
    proc = run(QEMU_IMG, "compare", "-f", fmt, "-F", "raw", image, raw, check=False)
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"


def qemu_repaired_copy(image: Path, fmt: str,
                       accept: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of ``image`` after ``qemu-img check -r all`` (which replays a vhdx log, repairs
    a qed image); ``accept`` judges the repair's report."""
    copy = image.with_name(image.name + ".repaired")
    shutil.copyfile(image, copy)
    result = qemu_check_json(copy, fmt, "-r", "all")
    if accept is not None:
        accept(result)
    return copy
