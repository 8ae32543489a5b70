#!/usr/bin/env python3
"""Sequential reads of 1 GiB vmdk and vhdx images: vdiskfs vs qemu-storage-daemon's FUSE export.

Images (cached under ~/.cache/vdiskfs/bench): 1 GiB of pseudo-random data converted by qemu-img
to vmdk (monolithicSparse) and vhdx (dynamic). fio reads each sequentially in 1 MiB requests
with a cold page cache; prints MB/s, the ratio vdiskfs/QSD and each daemon's CPU time.

Usage: .venv/bin/python scripts/bench/formats.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CACHE,
    GiB,
    fio,
    median_result,
    qsd_mount,
    random_file,
    report,
    require_root,
    run,
    vdiskfs_mount,
)

FORMATS = {"vmdk": ("-o", "subformat=monolithicSparse"), "vhdx": ("-o", "subformat=dynamic")}


def build(fmt: str) -> Path:
    image = CACHE / f"formats-1g.{fmt}"
    if not image.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        raw = CACHE / "formats-1g.raw"
        if not raw.exists():
            random_file(raw, GiB, seed=3)
        part = image.with_name(image.name + ".part")
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, *FORMATS[fmt], raw, part)
        part.rename(image)
    return image


def main() -> None:
    require_root()
    for fmt in FORMATS:
        image = build(fmt)
        mine, theirs = [], []
        for _ in range(3):  # alternating; the median run is printed
            with vdiskfs_mount(image) as ours:
                mine.append(fio(ours, rw="read", bs="1M", size="1G", direct=False))
            with qsd_mount(image, fmt=fmt) as peer:
                theirs.append(fio(peer, rw="read", bs="1M", size="1G", direct=False))
        report(f"1 GiB {fmt}: sequential 1 MiB read", median_result(mine),
               median_result(theirs), "MB/s")
    (CACHE / "formats-1g.raw").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
