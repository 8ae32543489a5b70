#!/usr/bin/env python3
"""Read benchmark: vdiskfs vs qemu-storage-daemon's FUSE export, same images, same run.

Images (built once, cached under ~/.cache/vdiskfs/bench):
  single.qcow2   2 GiB, 64 KiB clusters, fully allocated with pseudo-random data
  chain-top.qcow2 -> chain-mid.qcow2 -> chain-base.qcow2: a 3-layer backing chain where each
                 upper layer rewrote a third of the clusters, so reads hit every layer
Jobs (fio; page cache dropped before each): sequential 1 MiB reads (buffered, as `cat` reads),
random 4 KiB reads at queue depth 1 (psync) and 16 (libaio), both O_DIRECT. Prints MB/s or
IOPS, the ratio vdiskfs/QSD, and each daemon's CPU time per GiB and per request; each job runs
--repeat times per peer, alternating, and the median run is printed.

Usage: .venv/bin/python scripts/bench/read.py [--runtime S] [--repeat N] [--only single|chain]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CACHE,
    MiB,
    build_chain_base,
    build_overlay,
    build_single,
    fio,
    median_result,
    qsd_mount,
    report,
    require_root,
    vdiskfs_mount,
)


def build_chain() -> Path:
    """chain-top.qcow2 -> chain-mid.qcow2 -> chain-base.qcow2 (a copy of single.qcow2)."""
    top, mid = CACHE / "chain-top.qcow2", CACHE / "chain-mid.qcow2"
    if not top.exists():
        # Each upper layer rewrites every third cluster (mid: 1, 4, 7...; top: 2, 5, 8...).
        build_overlay(mid, build_chain_base(), first=1, step=3, pattern=0xAA)
        build_overlay(top, mid, first=2, step=3, pattern=0x55)
    return top


def bench(title: str, image: Path, runtime: int, repeat: int) -> list[str]:
    lines = []
    jobs = [
        ("sequential 1 MiB read", dict(rw="read", bs="1M", size="2G", direct=False), "MB/s"),
        ("random 4 KiB read qd1", dict(rw="randread", bs="4k", runtime=runtime), "IOPS"),
        ("random 4 KiB read qd16", dict(rw="randread", bs="4k", iodepth=16, runtime=runtime),
         "IOPS"),
    ]
    for name, kwargs, unit in jobs:
        mine, theirs = [], []
        for _ in range(repeat):  # alternate the peers so that drifts hit both alike
            with vdiskfs_mount(image) as ours:
                mine.append(fio(ours, **kwargs))  # type: ignore[arg-type]
            with qsd_mount(image) as peer:
                theirs.append(fio(peer, **kwargs))  # type: ignore[arg-type]
        lines.append(report(f"{title}: {name}", median_result(mine), median_result(theirs),
                            unit))
    return lines


def main() -> None:
    require_root()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per random job")
    parser.add_argument("--only", choices=["single", "chain"])
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per job and peer, alternating; the median is printed")
    args = parser.parse_args()
    print(f"images in {CACHE}; 2 GiB each, 64 KiB clusters; {MiB // MiB} MiB = 1048576 B")
    if args.only in (None, "single"):
        bench("2 GiB qcow2", build_single(), args.runtime, args.repeat)
    if args.only in (None, "chain"):
        bench("3-layer chain", build_chain(), args.runtime, args.repeat)


if __name__ == "__main__":
    main()
