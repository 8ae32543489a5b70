"""Requests cancelled while the host works on them, with every I/O engine (issue 9).

The image lives on :mod:`tests.support.slowfs`, a FUSE file system whose reads and writes take
as long as the test says, so a host request is really in the engine when its caller is
cancelled. A cancelled read returns at once (the engine keeps its buffer until the host is done
and then drops the result); a cancelled write is waited for, so nothing above believes a write
did not happen while it still goes to the disk. Either way no node has a request in flight
afterwards, the engine's count drains to zero, and the image stays consistent.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.concurrency import (
    ENGINES,
    assert_nothing_in_flight,
    assert_one_of_values,
    copy_image,
    settle,
    use_engine,
)
from tests.support.slowfs import slow_mount
from tests.support.workload import assert_clean, qemu_compare
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.protocol.engine import current_engine

pytestmark = pytest.mark.mount

MiB = 1 << 20
#: Seconds each slow host request takes; the caller is cancelled well before.
DELAY = 0.6
CANCEL_AFTER = 0.1


@pytest.fixture
def slow_dir(variant_templates: dict[str, Path],
             tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """``(slow mount, its source directory, control file)``: the qcow2 variant's image
    (4 KiB clusters) and its raw reference, served without delay until the control says."""
    image = copy_image(variant_templates, "qcow2", tmp_path)
    source = image.path.parent
    shutil.copyfile(image.reference, source / "reference.raw")
    control = tmp_path / "delay"
    control.write_text("0")
    with slow_mount(source, tmp_path / "slow", control) as mnt:
        yield mnt, source, control


async def _timed(node: BlockNode, request: str, *args: object) -> tuple[bool, float]:
    """Run ``node.<request>(*args)`` cancelled after CANCEL_AFTER; whether the cancellation
    was caught, and how long the call took."""
    start = trio.current_time()
    with trio.move_on_after(CANCEL_AFTER) as scope:
        await getattr(node, request)(*args)
    return scope.cancelled_caught, trio.current_time() - start


@pytest.mark.parametrize("engine", ENGINES)
async def test_cancelled_reads_of_a_slow_host_are_abandoned(
        slow_dir: tuple[Path, Path, Path], engine: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    mnt, _source, control = slow_dir
    use_engine(monkeypatch, engine)
    reference = (mnt / "reference.raw").read_bytes()
    node = await open_image(str(mnt / "disk.qcow2"), OpenOptions(format="qcow2"))
    try:
        engine_stats = current_engine().stats
        control.write_text(str(DELAY))
        # A cold read (its L2 slice is not cached yet), then 16 at once.
        caught, took = await _timed(node, "pread", 1 * MiB + 123, 4096)
        assert caught
        readers_cancelled = 0

        async def reader(offset: int) -> None:
            nonlocal readers_cancelled
            with trio.move_on_after(CANCEL_AFTER) as scope:
                await node.pread(offset, 70000)
            readers_cancelled += scope.cancelled_caught

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(reader, 3 * MiB + i * 200_000)
        took_all = trio.current_time()
        if engine == "inline":
            # Every system call blocks the event loop: the host request ends first.
            assert took >= DELAY * 0.9
        else:
            assert took < DELAY / 2, f"a cancelled read took {took:.2f} s"
            assert readers_cancelled == 16
            # The host still works on them: the engine holds them until it is done.
            assert engine_stats.in_flight > 0
        assert_nothing_in_flight(node)
        await settle(node)
        if engine != "inline":
            # The cold read's and at least one of the sixteen's (the others may wait for
            # the same table load).
            assert engine_stats.abandoned >= 2
            assert trio.current_time() - took_all < 5 * DELAY
        control.write_text("0")
        assert bytes(await node.pread(0, node.size)) == reference
        await settle(node)
    finally:
        control.write_text("0")
        await node.aclose()


@pytest.mark.parametrize("engine", ENGINES)
async def test_cancelled_write_to_a_slow_host_is_waited_for(
        slow_dir: tuple[Path, Path, Path], engine: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    mnt, source, control = slow_dir
    use_engine(monkeypatch, engine)
    model = bytearray((mnt / "reference.raw").read_bytes())
    node = await open_image(str(mnt / "disk.qcow2"), OpenOptions(read_only=False,
                                                                   format="qcow2"))
    try:
        # Unallocated clusters whose L2 slice and refcount block are cached: the write's
        # first host request is the data itself.
        await node.pwrite(100 * 4096, b"\x01" * 4096)
        model[100 * 4096 : 101 * 4096] = b"\x01" * 4096
        assert bytes(await node.pread(104 * 4096, 4096)) == model[104 * 4096 : 105 * 4096]
        offset, data = 104 * 4096 + 100, b"\x02" * 10000
        old = bytes(model[offset : offset + len(data)])
        control.write_text(str(DELAY))
        caught, took = await _timed(node, "pwrite", offset, data)
        # The host write was not abandoned: the call ended when it did (and, when it then
        # finished without meeting another checkpoint, it returned as a write that happened).
        assert took >= DELAY * 0.9, f"the cancelled write returned after {took:.2f} s"
        assert current_engine().stats.abandoned == 0
        assert_nothing_in_flight(node)
        await settle(node)
        control.write_text("0")
        got = bytes(await node.pread(offset, len(data)))
        if caught:
            assert_one_of_values(got, offset, old, data)
        else:
            assert got == data
        model[offset : offset + len(data)] = got
        # The node carries on.
        await node.pwrite(2 * MiB, b"\x03" * 50000)
        model[2 * MiB : 2 * MiB + 50000] = b"\x03" * 50000
        assert bytes(await node.pread(0, node.size)) == model
    finally:
        control.write_text("0")
        await node.aclose()
    image = source / "disk.qcow2"
    assert_clean(image, "qcow2")
    expected = source / "expected.raw"
    expected.write_bytes(model)
    qemu_compare(image, "qcow2", expected)
