#!/usr/bin/env python3
"""Write benchmark: vdiskfs --rw vs qemu-storage-daemon --export type=fuse,writable=on.

Into a fresh qcow2 (every write allocates) and into a preallocated one (metadata and clusters
already there), 1 GiB, 64 KiB clusters: sequential 1 MiB writes and random 4 KiB writes (queue
depth 1, O_DIRECT, fsync at the end). Each run gets its own new image, made by qemu-img, for
each peer; vdiskfs's is checked with qemu-img check afterwards. Each job runs --repeat times
per peer, alternating. Prints the median run's MB/s or IOPS, the ratio vdiskfs/QSD and each
daemon's CPU time.

Usage: .venv/bin/python scripts/bench/write.py [--runtime SECONDS] [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    check_image,
    fio,
    median_result,
    new_qcow2,
    qsd_mount,
    report,
    require_root,
    vdiskfs_mount,
)


def main() -> None:
    require_root()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per random job")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per job and peer, alternating; the median is printed")
    args = parser.parse_args()
    jobs = [
        ("sequential 1 MiB write", dict(rw="write", bs="1M", size="1G",
                                        extra=("--end_fsync=1",)), "MB/s"),
        ("random 4 KiB write qd1", dict(rw="randwrite", bs="4k", runtime=args.runtime,
                                        extra=("--end_fsync=1",)), "IOPS"),
    ]
    with tempfile.TemporaryDirectory(prefix="vdiskfs-wbench-", dir=Path.home()) as tmp:
        directory = Path(tmp)
        for preallocation, title in (("off", "fresh qcow2"), ("full", "preallocated qcow2")):
            for name, kwargs, unit in jobs:
                mine, theirs = [], []
                for _ in range(args.repeat):  # alternating; the median run is printed
                    ours_image = new_qcow2(directory / "ours.qcow2", "1G", preallocation)
                    with vdiskfs_mount(ours_image, ("--rw",)) as ours:
                        mine.append(fio(ours, **kwargs))  # type: ignore[arg-type]
                    check_image(ours_image)
                    ours_image.unlink()
                    peer_image = new_qcow2(directory / "peer.qcow2", "1G", preallocation)
                    with qsd_mount(peer_image, writable=True) as peer:
                        theirs.append(fio(peer, **kwargs))  # type: ignore[arg-type]
                    peer_image.unlink()
                report(f"{title}: {name}", median_result(mine), median_result(theirs), unit)


if __name__ == "__main__":
    main()
