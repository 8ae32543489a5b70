#!/usr/bin/env python3
"""Sparse copy benchmark (issue 11): `cp --sparse=auto` of a 100 GiB qcow2 holding 10 MiB.

Both peers export the same image: vdiskfs's mount and qemu-storage-daemon's FUSE export (whose
`lseek` answers SEEK_DATA/SEEK_HOLE from QEMU's block status). A copy that finds the holes reads
only the data, so it takes about the time of 10 MiB; one that does not reads 100 GiB of zeros
(minutes). Prints seconds per peer (median of --repeat), the ratio vdiskfs/qsd (lower is
better for vdiskfs), and checks that each copy equals `qemu-img convert -O raw`.

    .venv/bin/python scripts/bench/sparse_copy.py [--repeat 3] [--size 100G] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import CACHE, MiB, Mounted, drop_caches, qsd_mount, run, vdiskfs_mount

from tests.support.holes import assert_same_sparse_files

PIECES = 10  # 1 MiB each, spread over the disk


def build(size: str) -> Path:
    image = CACHE / f"sparse-{size}.qcow2"
    if image.exists():
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = image.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", partial, size)
    virtual = json.loads(run("qemu-img", "info", "--output=json", partial).stdout)["virtual-size"]
    step = virtual // PIECES // MiB * MiB
    commands = []
    for i in range(PIECES):
        commands += ["-c", f"write -P {i + 1} {i * step} 1M"]
    run("qemu-io", "-f", "qcow2", *commands, partial)
    partial.rename(image)
    return image


def copy_once(mounted: Mounted, scratch: Path) -> float:
    target = scratch / "copy.raw"
    target.unlink(missing_ok=True)
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["cp", "--sparse=auto", str(mounted.path), str(target)], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", default="100G")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    image = build(args.size)
    with tempfile.TemporaryDirectory(prefix="sparse-copy-") as tmp:
        scratch = Path(tmp)
        reference = scratch / "reference.raw"
        run("qemu-img", "convert", "-O", "raw", image, reference)
        seconds: dict[str, list[float]] = {"vdiskfs": [], "qsd": []}
        for _ in range(args.repeat):
            for peer in ("vdiskfs", "qsd"):
                mount = vdiskfs_mount(image) if peer == "vdiskfs" else qsd_mount(image)
                with mount as mounted:
                    seconds[peer].append(copy_once(mounted, scratch))
                copy = scratch / "copy.raw"
                try:
                    assert_same_sparse_files(copy, reference)
                except AssertionError as exc:
                    raise SystemExit(f"{peer}: the copy differs from qemu-img convert: "
                                     f"{exc}") from None
                allocated = copy.stat().st_blocks * 512
                copy.unlink()
        result = {peer: statistics.median(values) for peer, values in seconds.items()}
        ratio = result["vdiskfs"] / result["qsd"]
    print(f"cp --sparse=auto of a {args.size} qcow2 with {PIECES} MiB of data "
          f"(median of {args.repeat}, copies equal qemu-img convert, last copy allocates "
          f"{allocated / MiB:.0f} MiB):")
    for peer, value in result.items():
        print(f"  {peer:8s} {value:8.2f} s")
    print(f"  time ratio vdiskfs/qsd: {ratio:.2f} (below 1: vdiskfs faster)")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "median": result,
                                         "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
