"""Data ranges and ``qemu-img map``: the oracle of the hole tests (block layer and mount)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support.images import QEMU_IMG
from vdiskfs.block.node import BlockNode, BlockStatus

Ranges = list[tuple[int, int]]


def merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for start, end in sorted(ranges):
        if start == end:
            continue
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


async def status_runs(node: BlockNode) -> list[tuple[int, int, bool, bool]]:
    """``(start, length, data, zero)`` of the whole node by block status, adjacent runs alike
    merged: what ``qemu-img map --output=json`` lists for the same image."""
    runs: list[tuple[int, int, bool, bool]] = []
    offset = 0
    while offset < node.size:
        status, run = await node.block_status(offset, node.size - offset)
        flags = (bool(status & BlockStatus.DATA), bool(status & BlockStatus.ZERO))
        if runs and runs[-1][2:] == flags:
            runs[-1] = (runs[-1][0], runs[-1][1] + run, *flags)
        else:
            runs.append((offset, run, *flags))
        offset += run
    return runs


def qemu_map(image: Path, *, fmt: str | None = None) -> list[dict[str, Any]]:
    # In the image's directory: QEMU resolves a relative external data file name against the
    # working directory.
    args = [QEMU_IMG, "map", "--output=json", *(["-f", fmt] if fmt else []), image.name]
    return json.loads(subprocess.run(args, cwd=image.parent, check=True, text=True,
                                     capture_output=True).stdout)


def qemu_data_ranges(image: Path, *, fmt: str | None = None) -> Ranges:
    return merge([(e["start"], e["start"] + e["length"])
                   for e in qemu_map(image, fmt=fmt) if e["data"]])


def assert_agrees_with_qemu(found: Ranges, image: Path, *, fmt: str | None = None) -> None:
    """Where ``qemu-img map`` is definite, ours says the same: ``"data": false`` is a hole,
    ``"data": true, "zero": false`` is data. QEMU also reports ``"data": true, "zero": true``
    (a flat vmdk extent or a fixed VHD over holes of its host file): that reads as zeros and
    either answer is right; ours follows the host file's holes there, as for raw."""
    ours = merge(found)
    for entry in qemu_map(image, fmt=fmt):
        start, end = entry["start"], entry["start"] + entry["length"]
        covered = sum(max(0, min(end, b) - max(start, a)) for a, b in ours)
        if not entry["data"]:
            assert covered == 0, f"qemu-img map: {entry}; ours: data in it ({ours})"
        elif not entry["zero"]:
            assert covered == end - start, f"qemu-img map: {entry}; ours: a hole in it ({ours})"


def assert_holes_read_zero(data: Ranges, reference: bytes) -> None:
    cursor = 0
    for start, end in [*data, (len(reference), len(reference))]:
        hole = reference[cursor:start]
        assert hole.count(0) == len(hole), f"hole {cursor}..{start} does not read as zeros"
        cursor = end


def file_data_ranges(path: Path) -> Ranges:
    """Where a (local, sparse) file holds data, by SEEK_DATA/SEEK_HOLE."""
    import os

    ranges: Ranges = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            offset = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            ranges.append((start, offset))
    return ranges


def assert_same_sparse_files(a: Path, b: Path) -> None:
    """Byte equality of two sparse files, reading only where either holds data (elsewhere both
    are holes): ``cmp`` of two 20 GiB files would read 40 GiB of zeros."""
    import os

    assert a.stat().st_size == b.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in merge(file_data_ranges(a) + file_data_ranges(b)):
            for offset in range(start, end, 1 << 24):
                n = min(1 << 24, end - offset)
                assert os.pread(fa.fileno(), n, offset) == os.pread(fb.fileno(), n, offset), (
                    f"{a} and {b} differ in {offset}..{offset + n}")
