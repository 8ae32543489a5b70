#!/usr/bin/env python3
"""What one wait for a socket costs in trio, against a plain epoll loop in the same process.

Every request that vdiskfs sends over the network waits for its answer once at least, and a
FUSE request at queue depth 1 adds a wait for /dev/fuse: at depth 1 these waits are on the
critical path of every read, with nothing to overlap them. This script measures their floor:
one small message sent over a socketpair to an echo process and its answer read back, N times,
one at a time, in three ways in the same run:

  epoll         a plain Python loop: send, read, on EAGAIN ``select.epoll.poll`` (no trio)
  trio-wait     one trio task: send, read, on EAGAIN ``trio.lowlevel.wait_readable``
  trio-handoff  as the NBD client: a reader task waits for the socket, reads the answer and
                reschedules the requesting task, which sleeps meanwhile

and prints the wall time and the client thread's user and system CPU per round trip. The
difference of the user CPU of trio-wait and of epoll is what trio adds per wait (the run loop's
pass, its epoll registration, the task switch). For scale: qemu-storage-daemon spends 14-17 us
of user CPU on a whole 4 KiB NBD read at depth 1, FUSE request and reply included
(`scripts/bench/remote.py`, `nbd-qd1`).

Usage: .venv/bin/python scripts/bench/event_loop.py [--round-trips N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import trio

#: The echo peer: a separate process, so that it takes no GIL from the measured thread.
ECHO = """
import os, sys
fd = int(sys.argv[1])
while True:
    data = os.read(fd, 64)
    if not data:
        break
    os.write(fd, data)
"""

Sample = tuple[float, float, float]  # wall, user, sys seconds per round trip


def _measure(body: Callable[[], None], n: int) -> Sample:
    before = resource.getrusage(resource.RUSAGE_THREAD)
    start = time.perf_counter()
    body()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return wall / n, (after.ru_utime - before.ru_utime) / n, (after.ru_stime - before.ru_stime) / n


def plain_epoll(fd: int, n: int) -> Sample:
    def body() -> None:
        poller = select.epoll()
        poller.register(fd, select.EPOLLIN)
        try:
            for _ in range(n):
                os.write(fd, b"x")
                while True:
                    try:
                        os.read(fd, 64)
                        break
                    except BlockingIOError:
                        poller.poll()
        finally:
            poller.close()
    return _measure(body, n)


def trio_wait(fd: int, n: int) -> Sample:
    async def body() -> None:
        for _ in range(n):
            os.write(fd, b"x")
            while True:
                try:
                    os.read(fd, 64)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
    return _measure(lambda: trio.run(body), n)


def trio_handoff(fd: int, n: int) -> Sample:
    async def body() -> None:
        waiting: list[trio.lowlevel.Task] = []

        async def reader() -> None:
            while True:
                try:
                    os.read(fd, 64)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                trio.lowlevel.reschedule(waiting.pop())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for _ in range(n):
                waiting.append(trio.lowlevel.current_task())
                os.write(fd, b"x")
                await trio.lowlevel.wait_task_rescheduled(
                    lambda _: trio.lowlevel.Abort.SUCCEEDED)
            nursery.cancel_scope.cancel()
    return _measure(lambda: trio.run(body), n)


WAYS: dict[str, Callable[[int, int], Sample]] = {
    "epoll": plain_epoll, "trio-wait": trio_wait, "trio-handoff": trio_handoff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ours, theirs = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),))
    theirs.close()
    ours.setblocking(False)
    samples: dict[str, list[Sample]] = {way: [] for way in WAYS}
    try:
        for _ in range(args.repeat):  # interleaved: the machine's load moves between runs
            for way, run in WAYS.items():
                samples[way].append(run(ours.fileno(), args.round_trips))
    finally:
        ours.close()
        echo.wait()
    print(f"{args.round_trips} round trips x {args.repeat}, medians per round trip "
          f"(client thread):")
    medians: dict[str, Sample] = {}
    for way, runs in samples.items():
        wall, user, system = (statistics.median(column) for column in zip(*runs, strict=True))
        medians[way] = wall, user, system
        print(f"  {way:13} {wall * 1e6:6.1f} us wall  {user * 1e6:5.1f} us user  "
              f"{system * 1e6:5.1f} us sys")
    extra = medians["trio-wait"][1] - medians["epoll"][1]
    print(f"trio adds {extra * 1e6:.1f} us of user CPU per wait over a plain epoll loop; "
          f"a reader task handing the answer over adds "
          f"{(medians['trio-handoff'][1] - medians['trio-wait'][1]) * 1e6:.1f} us more")


if __name__ == "__main__":
    main()
