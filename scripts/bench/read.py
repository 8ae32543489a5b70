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
    GiB,
    MiB,
    fio,
    median_result,
    qsd_mount,
    random_file,
    report,
    require_root,
    run,
    vdiskfs_mount,
)

CLUSTER = 64 * 1024


def build_single() -> Path:
    image = CACHE / "single.qcow2"
    if not image.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        raw = random_file(CACHE / "single.tmp", 2 * GiB)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
            f"cluster_size={CLUSTER}", raw, image.with_suffix(".part"))
        raw.unlink()
        image.with_suffix(".part").rename(image)
    return image


def build_chain() -> Path:
    top = CACHE / "chain-top.qcow2"
    if top.exists():
        return top
    base, mid = CACHE / "chain-base.qcow2", CACHE / "chain-mid.qcow2"
    if not base.exists():
        run("cp", "--reflink=auto", build_single(), base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2",
        top.with_suffix(".part"))
    # Each upper layer rewrites every third cluster (mid: 1, 4, 7...; top: 2, 5, 8...).
    for image, first, pattern in ((mid, 1, 0xAA), (top.with_suffix(".part"), 2, 0x55)):
        commands = "".join(
            f"write -q -P {pattern} {offset} {CLUSTER}\n"
            for offset in range(first * CLUSTER, 2 * GiB, 3 * CLUSTER)
        )
        run("qemu-io", "-f", "qcow2", image, input=commands)
    top.with_suffix(".part").rename(top)
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
