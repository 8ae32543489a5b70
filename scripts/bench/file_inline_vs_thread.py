#!/usr/bin/env python3
"""Should the file node call os.pread inline on the trio thread or hop to a worker thread?

Times page-cached reads of 4 KiB and 128 KiB (FUSE's usual request size) both ways, one at a
time and 16 concurrent tasks, in a trio loop like the FUSE daemon's.
Usage: .venv/bin/python scripts/bench/file_inline_vs_thread.py
"""

from __future__ import annotations

import os
import random
import tempfile
import time

import trio


async def run_reads(fd: int, size: int, block: int, count: int, tasks: int,
                    threaded: bool) -> float:
    rng = random.Random(2)
    offsets = [rng.randrange(0, size - block) for _ in range(count)]
    per_task = count // tasks

    async def worker(chunk: list[int]) -> None:
        for off in chunk:
            if threaded:
                await trio.to_thread.run_sync(os.pread, fd, block, off)
            else:
                os.pread(fd, block, off)
                await trio.lowlevel.checkpoint()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(worker, offsets[t * per_task:(t + 1) * per_task])
    return (time.perf_counter() - start) / (per_task * tasks) * 1e6


async def main() -> None:
    size = 256 << 20
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(size))
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        for block in (4096, 128 * 1024):
            for tasks in (1, 16):
                inline = await run_reads(fd, size, block, 20000, tasks, threaded=False)
                thread = await run_reads(fd, size, block, 20000, tasks, threaded=True)
                print(f"{block // 1024:>4} KiB x{tasks:<2} tasks: inline {inline:7.1f} us/read,"
                      f" thread {thread:7.1f} us/read, thread/inline {thread / inline:4.2f}x")
        os.close(fd)


if __name__ == "__main__":
    trio.run(main)
