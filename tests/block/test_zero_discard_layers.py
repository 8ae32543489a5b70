"""Discard and write-zeroes counters move in every layer the request crosses (issue 11).

Each test builds a real tree (qcow2 over file; a qcow2 overlay over a backing file; a partition
window over a disk; raw over file), calls ``zero(..., may_unmap=True)``, ``zero`` without unmap
and ``discard`` at the top, flushes, and compares every node's ``zero_*``, ``unmap_*`` and
``failed_*`` counters with what the request should have done there. Nodes are named as the
stats files name them (``<n>-<driver>``, pre-order from the top).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.images import create, qemu_img, qemu_io, reference_raw
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.filter.offset import OffsetNode

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB

#: ``(zero bytes, unmap bytes)`` per node name.
Moves = dict[str, tuple[int, int]]


def _names(top: BlockNode) -> dict[str, BlockNode]:
    return {f"{i}-{node.driver}": node for i, (_, _, node) in enumerate(top.walk())}


def _counters(top: BlockNode) -> dict[str, dict[str, int]]:
    return {name: node.stats_snapshot().as_dict() for name, node in _names(top).items()}


def _moves(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> Moves:
    for name, stats in after.items():
        assert stats["failed_zero_operations"] == 0 and stats["failed_unmap_operations"] == 0, (
            name, stats)
        assert stats["invalid_zero_operations"] == 0 and stats["invalid_unmap_operations"] == 0
        for prefix in ("zero", "unmap"):
            # An operation is counted with its bytes, never one without the other.
            ops = stats[f"{prefix}_operations"] - before[name][f"{prefix}_operations"]
            nbytes = stats[f"{prefix}_bytes"] - before[name][f"{prefix}_bytes"]
            assert (ops > 0) == (nbytes > 0), (name, prefix, ops, nbytes)
    return {name: (stats["zero_bytes"] - before[name]["zero_bytes"],
                   stats["unmap_bytes"] - before[name]["unmap_bytes"])
            for name, stats in after.items()}


async def _zero(top: BlockNode, offset: int, length: int, *, may_unmap: bool) -> Moves:
    before = _counters(top)
    await top.zero(offset, length, may_unmap=may_unmap)
    await top.flush()  # qcow2 hands freed clusters to its file once the metadata is on disk
    return _moves(before, _counters(top))


async def _discard(top: BlockNode, offset: int, length: int) -> Moves:
    before = _counters(top)
    await top.discard(offset, length)
    await top.flush()
    return _moves(before, _counters(top))


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _qcow2_with_data(path: Path, **options: object) -> Path:
    create(path, "4M", cluster_size=CLUSTER, **options)
    qemu_io(path, "write -P 0xab 0 3M", fmt="qcow2")
    return path


async def _open_rw(path: Path, fmt: str | None = None) -> BlockNode:
    return await open_image(str(path), OpenOptions(read_only=False, format=fmt))


def _assert_clean(path: Path) -> None:
    out = qemu_img("check", str(path))
    assert "No errors were found on the image." in out, out
    assert "leaked" not in out, out


async def test_qcow2_over_file(tmp_path: Path) -> None:
    image = _qcow2_with_data(tmp_path / "disk.qcow2")
    top = await _open_rw(image)
    try:
        before = _allocated(image)
        # Whole allocated clusters, unmapping allowed: zero clusters at the top, their host
        # clusters freed and punched out of the file.
        assert await _zero(top, 0, 4 * CLUSTER, may_unmap=True) == {
            "0-qcow2": (4 * CLUSTER, 0), "1-file": (0, 4 * CLUSTER)}
        # Without unmap the clusters stay allocated (zero flag): nothing below the top.
        assert await _zero(top, 8 * CLUSTER, 2 * CLUSTER, may_unmap=False) == {
            "0-qcow2": (2 * CLUSTER, 0), "1-file": (0, 0)}
        # Discard: the clusters go, and their holes reach the file.
        assert await _discard(top, 1 * MiB, 4 * CLUSTER) == {
            "0-qcow2": (0, 4 * CLUSTER), "1-file": (0, 4 * CLUSTER)}
        # Eight clusters punched (metadata rewritten in place may fill a few blocks that
        # qemu-img had left sparse).
        assert before - _allocated(image) >= 7 * CLUSTER
        assert await top.pread(0, 4 * CLUSTER) == bytes(4 * CLUSTER)
        assert await top.pread(1 * MiB, 4 * CLUSTER) == bytes(4 * CLUSTER)
        assert await top.pread(2 * MiB, 1) == b"\xab"
    finally:
        await top.aclose()
    _assert_clean(image)
    expected = bytearray(b"\xab" * 3 * MiB + bytes(MiB))
    for offset, length in ((0, 4 * CLUSTER), (8 * CLUSTER, 2 * CLUSTER), (MiB, 4 * CLUSTER)):
        expected[offset : offset + length] = bytes(length)
    assert reference_raw(image, image.with_suffix(".raw")).read_bytes() == expected


async def test_overlay_with_a_backing_file(tmp_path: Path) -> None:
    base = _qcow2_with_data(tmp_path / "base.qcow2")
    overlay = create(tmp_path / "overlay.qcow2", "4M", cluster_size=CLUSTER, backing=base,
                     backing_fmt="qcow2")
    qemu_io(overlay, "write -P 0xcd 0 2M", fmt="qcow2")
    base_bytes = base.read_bytes()
    top = await _open_rw(overlay)
    try:
        assert list(_names(top)) == ["0-qcow2", "1-file", "2-qcow2", "3-file"]
        before = _allocated(overlay)
        # Overlay clusters zeroed with unmap: zero clusters (the backing file must not show
        # through), the overlay's host clusters punched; the backing file sees nothing.
        assert await _zero(top, 0, 4 * CLUSTER, may_unmap=True) == {
            "0-qcow2": (4 * CLUSTER, 0), "1-file": (0, 4 * CLUSTER),
            "2-qcow2": (0, 0), "3-file": (0, 0)}
        # Discard of overlay clusters and of clusters only the backing file has.
        assert await _discard(top, 1 * MiB, 4 * CLUSTER) == {
            "0-qcow2": (0, 4 * CLUSTER), "1-file": (0, 4 * CLUSTER),
            "2-qcow2": (0, 0), "3-file": (0, 0)}
        assert await _discard(top, 2 * MiB, 4 * CLUSTER) == {
            "0-qcow2": (0, 4 * CLUSTER), "1-file": (0, 0),
            "2-qcow2": (0, 0), "3-file": (0, 0)}
        # Eight clusters punched (metadata rewritten in place may fill a few blocks that
        # qemu-img had left sparse).
        assert before - _allocated(overlay) >= 7 * CLUSTER
        for offset in (0, 1 * MiB, 2 * MiB):
            assert await top.pread(offset, 4 * CLUSTER) == bytes(4 * CLUSTER)
        assert await top.pread(3 * MiB - 1, 1) == b"\xab"  # still the backing file's
    finally:
        await top.aclose()
    _assert_clean(overlay)
    assert base.read_bytes() == base_bytes


async def test_partition_window_over_qcow2(tmp_path: Path) -> None:
    """A partition file's node, as ``fs/daemon.py`` builds it: an offset filter onto the disk."""
    image = _qcow2_with_data(tmp_path / "disk.qcow2")
    disk = await _open_rw(image)
    start = 1 * MiB
    window = OffsetNode(disk, offset=start, length=2 * MiB, owns_child=False)
    await window.open()
    try:
        assert list(_names(window)) == ["0-offset", "1-qcow2", "2-file"]
        assert await _zero(window, CLUSTER, 2 * CLUSTER, may_unmap=True) == {
            "0-offset": (2 * CLUSTER, 0), "1-qcow2": (2 * CLUSTER, 0), "2-file": (0, 2 * CLUSTER)}
        assert await _discard(window, 8 * CLUSTER, 4 * CLUSTER) == {
            "0-offset": (0, 4 * CLUSTER), "1-qcow2": (0, 4 * CLUSTER), "2-file": (0, 4 * CLUSTER)}
        # The window's offsets were translated: the disk changed at start + offset only.
        assert await disk.pread(start, CLUSTER) == b"\xab" * CLUSTER
        assert await disk.pread(start + CLUSTER, 2 * CLUSTER) == bytes(2 * CLUSTER)
        assert await disk.pread(start + 3 * CLUSTER, CLUSTER) == b"\xab" * CLUSTER
        assert await disk.pread(start + 8 * CLUSTER, 4 * CLUSTER) == bytes(4 * CLUSTER)
        assert await disk.pread(0, 4 * CLUSTER) == b"\xab" * 4 * CLUSTER
    finally:
        await window.aclose()
        await disk.aclose()
    _assert_clean(image)


async def test_raw_over_file_and_its_window(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xab" * 4 * MiB)
    top = await _open_rw(image, "raw")
    try:
        assert list(_names(top)) == ["0-raw", "1-file"]
        before = _allocated(image)
        # The file node zeroes by punching a hole (unmap allowed) or zeroing the range in
        # place: either way it is a zero request there.
        assert await _zero(top, 0, 4 * CLUSTER, may_unmap=True) == {
            "0-raw": (4 * CLUSTER, 0), "1-file": (4 * CLUSTER, 0)}
        assert await _zero(top, 8 * CLUSTER, 2 * CLUSTER, may_unmap=False) == {
            "0-raw": (2 * CLUSTER, 0), "1-file": (2 * CLUSTER, 0)}
        assert await _discard(top, 1 * MiB, 4 * CLUSTER) == {
            "0-raw": (0, 4 * CLUSTER), "1-file": (0, 4 * CLUSTER)}
        # The punched holes (less a block or two that the host file system may take for the
        # extent tree of the now fragmented file).
        assert before - _allocated(image) >= 8 * CLUSTER - 2 * 4096

        window = OffsetNode(top, offset=2 * MiB, length=MiB, owns_child=False)
        await window.open()
        try:
            assert await _discard(window, 0, 4 * CLUSTER) == {
                "0-offset": (0, 4 * CLUSTER), "1-raw": (0, 4 * CLUSTER), "2-file": (0, 4 * CLUSTER)}
            assert await _zero(window, 4 * CLUSTER, CLUSTER, may_unmap=True) == {
                "0-offset": (CLUSTER, 0), "1-raw": (CLUSTER, 0), "2-file": (CLUSTER, 0)}
        finally:
            await window.aclose()
    finally:
        await top.aclose()
    expected = bytearray(b"\xab" * 4 * MiB)
    for offset, length in ((0, 4 * CLUSTER), (8 * CLUSTER, 2 * CLUSTER), (MiB, 4 * CLUSTER),
                           (2 * MiB, 5 * CLUSTER)):
        expected[offset : offset + length] = bytes(length)
    assert image.read_bytes() == expected
