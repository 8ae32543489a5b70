#!/usr/bin/env python3
"""The file node's I/O engines against each other: io_uring, threads, inline.

Reads of 4 KiB at random offsets of a 512 MiB file, in a trio loop like the FUSE daemon's,
through `IoEngine.read` exactly as the file node calls it: from the page cache (hot) one at a
time and from 16 tasks, and from the disk (cold: the file's pages dropped first) from 16
tasks. Prints, per engine, the wall time and the process's CPU time (every thread, kernel
included) per read, and how many reads were answered inline.
Usage: .venv/bin/python scripts/bench/io_engines.py [--reads N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vdiskfs.drivers.protocol import engine as engines

SIZE = 512 << 20
BLOCK = 4096


async def run(name: str, path: str, reads: int, tasks: int, hot: bool) -> str:
    os.environ["VDISKFS_IO_ENGINE"] = name
    engine = engines.current_engine()
    fd = os.open(path, os.O_RDONLY)
    try:
        if hot:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            for offset in range(0, SIZE, 1 << 20):
                os.pread(fd, 1 << 20, offset)
        else:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        f = engines.HostFile(fd, engines.IoCounters())
        rng = random.Random(1)
        offsets = [rng.randrange(0, SIZE // BLOCK) * BLOCK for _ in range(reads)]

        async def worker(chunk: list[int]) -> None:
            view = memoryview(bytearray(BLOCK))
            for offset in chunk:
                await engine.read(f, view, offset)

        wall, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                nursery.start_soon(worker, offsets[i::tasks])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        os.close(fd)
    engine.close()
    return (f"{name:9} {'hot' if hot else 'cold':4} x{tasks:<3} {wall / reads * 1e6:7.1f} us wall "
            f"{cpu / reads * 1e6:7.1f} us CPU per read, {f.counters.inline_reads} inline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="io-engines-") as tmp:
        chunk = os.urandom(1 << 20)
        for _ in range(SIZE >> 20):
            tmp.write(chunk)
        tmp.flush()
        os.fsync(tmp.fileno())
        for hot, tasks in ((True, 1), (True, 16), (False, 16)):
            for name in engines.ENGINE_NAMES:
                if name == "auto":
                    continue
                print(trio.run(run, name, tmp.name, args.reads, tasks, hot), flush=True)


if __name__ == "__main__":
    main()
