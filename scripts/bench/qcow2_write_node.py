#!/usr/bin/env python3
"""qcow2 write benchmark at the node level (no FUSE): vdiskfs's Qcow2Node against QEMU's block
layer driven by ``qemu-img bench -w`` on the same kind of image, same run.

Jobs, each into a fresh image and into a preallocated one (preallocation=metadata):
  seq-1M   sequential 1 MiB writes over the whole disk (MB/s)
  rand-4k  4 KiB writes at scattered offsets, queue depth 1 (IOPS): offsets step by a large odd
           multiple of 4 KiB modulo the disk size, which is what qemu-img bench can do too
Both end with a flush, inside the timing. The page cache absorbs the data (the image is small
next to RAM): this measures the driver, not the disk.

Usage: .venv/bin/python scripts/bench/qcow2_write_node.py [--size MiB] [--count N]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vdiskfs.block.context import OpenOptions, open_image  # noqa: E402
from vdiskfs.drivers.format.qcow2.create import create_qcow2  # noqa: E402

MiB = 1 << 20
STEP = 4096 * 7919  # coprime with any power-of-two disk size in 4 KiB units


def offsets(job: str, size: int, count: int) -> tuple[int, list[int]]:
    if job == "seq-1M":
        return MiB, [i * MiB % size for i in range(count)]
    return 4096, [i * STEP % size for i in range(count)]


async def ours(path: Path, job: str, size: int, count: int) -> float:
    block, where = offsets(job, size, count)
    data = random.Random(1).randbytes(block)
    node = await open_image(str(path), OpenOptions(read_only=False, format="qcow2"))
    try:
        start = time.perf_counter()
        for offset in where:
            await node.pwrite(offset, data)
        await node.flush()
        return time.perf_counter() - start
    finally:
        await node.aclose()


def qemu(path: Path, job: str, size: int, count: int) -> float:
    block, _ = offsets(job, size, count)
    step = MiB if job == "seq-1M" else STEP
    start = time.perf_counter()
    subprocess.run(["qemu-img", "bench", "-w", "-f", "qcow2", "-t", "writeback", "-d", "1",
                    "-c", str(count), "-s", str(block), "-S", str(step), "--pattern=0x5a",
                    str(path)], check=True, capture_output=True)
    # qemu-img bench flushes at the end; its process start is in the timing, as ours is not:
    # a few milliseconds, small next to the runs below.
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="disk size in MiB")
    parser.add_argument("--count", type=int, default=20000, help="4 KiB writes per run")
    args = parser.parse_args()
    size = args.size * MiB
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        for job in ("seq-1M", "rand-4k"):
            count = args.size if job == "seq-1M" else args.count
            for prealloc in ("off", "metadata"):
                results = {}
                for who in ("vdiskfs", "qemu"):
                    path = Path(tmp) / f"{who}-{job}-{prealloc}.qcow2"
                    trio.run(lambda p=path, m=prealloc: create_qcow2(str(p), size,
                                                                    preallocation=m))
                    if who == "vdiskfs":
                        seconds = trio.run(ours, path, job, size, count)
                    else:
                        seconds = qemu(path, job, size, count)
                    check = subprocess.run(["qemu-img", "check", "-q", str(path)])
                    assert check.returncode == 0, f"{path} does not pass qemu-img check"
                    results[who] = seconds
                    path.unlink()
                    if job == "seq-1M":
                        rate = count * MiB / seconds / 1e6
                        unit = "MB/s"
                    else:
                        rate = count / seconds
                        unit = "IOPS"
                    results[who + "_rate"] = rate
                ratio = results["vdiskfs_rate"] / results["qemu_rate"]
                rows.append((job, prealloc, results["vdiskfs_rate"], results["qemu_rate"], unit,
                             ratio))
    print(f"{'job':8} {'image':9} {'vdiskfs':>10} {'qemu-img':>10} unit  ratio")
    for job, prealloc, mine, theirs, unit, ratio in rows:
        image = "fresh" if prealloc == "off" else "prealloc"
        print(f"{job:8} {image:9} {mine:10.0f} {theirs:10.0f} {unit:5} {ratio:.2f}")


if __name__ == "__main__":
    main()
