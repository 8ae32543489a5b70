#!/usr/bin/env python3
"""Benchmark of the ``cache`` filter: reads of an image over HTTP from a server that answers
each request after a delay (a round trip), with the cache and without (``--no-cache``).

Two patterns, each on a fresh open: sequential 128 KiB reads of the whole image (what a FUSE
reader of ``disk.raw`` sends), where readahead keeps the next blocks in flight; and 4 KiB reads
at random offsets of a 64 MiB image (a format reading tables and clusters), where a miss costs
a whole 256 KiB block. The server is ``tests.support.http_server.flaky_server``, which serves
one request per connection thread, so requests in flight overlap. Usage:

    scripts/bench/cache.py [--delay 0.01] [--mib 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.http_server import flaky_server
from vdiskfs.block.context import OpenOptions, open_image

KiB = 1 << 10


async def _read(url: str, cache: bool, pattern: str) -> tuple[float, int]:
    node = await open_image(url, OpenOptions(format="raw", cache=cache))
    async with node:
        start = time.perf_counter()
        if pattern == "sequential":
            for offset in range(0, node.size, 128 * KiB):
                await node.pread(offset, min(128 * KiB, node.size - offset))
        else:
            rng = random.Random(1)
            for _ in range(256):
                await node.pread(rng.randrange(0, node.size // 4096) * 4096, 4096)
        http = next(n for _, _, n in node.walk() if n.driver == "http")
        return time.perf_counter() - start, http.counters.requests  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.01, help="seconds per answer")
    parser.add_argument("--mib", type=int, default=8, help="size of the sequential image")
    args = parser.parse_args()
    for pattern, size in (("sequential", args.mib << 20), ("random 4k", 64 << 20)):
        with flaky_server(os.urandom(size), delay=args.delay) as base:
            for cache in (False, True):
                seconds, requests = trio.run(_read, f"{base}/disk.raw", cache, pattern)
                print(f"{pattern:10} {'cache' if cache else 'no cache':8} {seconds:6.2f} s "
                      f"{requests:5} requests")


if __name__ == "__main__":
    main()
