#!/usr/bin/env python3
"""What per-node accounting costs: a read through a node with and without its statistics.

Reads 4 KiB at random offsets of a page-cached file through (a) os.pread, (b) a FileNode with
accounting as shipped, (c) the same FileNode with accounting bypassed (calling the driver verb
directly), and prints nanoseconds per read and the accounting's share.
Usage: .venv/bin/python scripts/bench/stats_overhead.py [--reads N]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import trio

from vdiskfs.drivers.protocol.file import FileNode


async def measure(reads: int) -> None:
    size = 64 << 20
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(size))
        f.flush()
        offsets = [random.Random(1).randrange(0, size - 4096) & ~4095 for _ in range(reads)]
        node = FileNode(f.name)
        await node.open()

        def bare() -> None:
            for off in offsets:
                os.pread(node.fd, 4096, off)

        async def accounted() -> None:
            for off in offsets:
                await node.pread(off, 4096)

        async def unaccounted() -> None:
            for off in offsets:
                await node._pread(off, 4096)

        results = {}
        for name, fn in (("os.pread", bare), ("node.pread (accounted)", accounted),
                         ("node._pread (no accounting)", unaccounted)):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter_ns()
                out = fn()
                if out is not None:
                    await out
                best = min(best, (time.perf_counter_ns() - start) / reads)
            results[name] = best
            print(f"{name:<30} {best:8.0f} ns/read")
        await node.aclose()
        cost = results["node.pread (accounted)"] - results["node._pread (no accounting)"]
        print(f"accounting costs {cost:.0f} ns per request "
              f"({cost / results['node.pread (accounted)']:.0%} of a cached 4 KiB node read)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=50_000)
    trio.run(measure, parser.parse_args().reads)


if __name__ == "__main__":
    main()
