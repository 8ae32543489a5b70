"""A deterministic random write workload, applied to anything that writes like a block node,
with a raw model of what the disk must hold afterwards.

``make_workload(size, seed)`` lists the operations (unaligned writes, writes across cluster
boundaries, large writes, buffers of zeros, zeroing and discarding, writes to the partial last
cluster, the same cluster over and over, flushes); ``apply_workload(target, model, ops)`` runs them
and keeps ``model`` equal to what the target must read back. The target is a
:class:`WorkloadTarget`: a :class:`~vdiskfs.block.node.BlockNode`, or an adapter around a file of
the FUSE mount.

A discard leaves the range unspecified, so the model takes what the target reads there right
after it; ``qemu-img compare`` against the model then checks that QEMU reads the same.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tests.support.images import QEMU_IMG

KiB = 1024
MiB = 1024 * KiB


class WorkloadTarget(Protocol):
    size: int

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def pwrite(self, offset: int, data: bytes) -> None: ...

    async def zero(self, offset: int, length: int, *, may_unmap: bool = False) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Operation:
    #: "write", "zero", "discard" or "flush".
    kind: str
    offset: int = 0
    length: int = 0
    #: For writes: the seed of the data, or None for a buffer of zeros.
    seed: int | None = None
    may_unmap: bool = False

    def data(self) -> bytes:
        if self.seed is None:
            return bytes(self.length)
        return random.Random(self.seed).randbytes(self.length)


def make_workload(size: int, seed: int, *, count: int = 160, cluster_size: int = 64 * KiB,
                  flush_every: int = 25, large: int = 1 * MiB,
                  hot_spots: tuple[int, ...] = ()) -> list[Operation]:
    """``count`` operations over a disk of ``size`` bytes, the same for the same arguments.

    ``hot_spots``: guest offsets worth hitting on purpose (compressed clusters, backing data,
    zero clusters of the image under test); writes land on and around them often.
    """
    rng = random.Random(seed)
    ops: list[Operation] = []

    def clip(offset: int, length: int) -> tuple[int, int]:
        offset = max(0, min(offset, size - 1))
        return offset, max(1, min(length, size - offset))

    for i in range(count):
        choice = rng.random()
        spot = rng.choice(hot_spots) if hot_spots and rng.random() < 0.3 else None
        if choice < 0.25:  # small and unaligned
            base = spot if spot is not None else rng.randrange(size)
            offset, length = clip(base + rng.randrange(-3000, 3000), rng.randrange(1, 9000))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        elif choice < 0.45:  # across a cluster boundary
            boundary = (rng.randrange(size) // cluster_size + 1) * cluster_size
            offset, length = clip(boundary - rng.randrange(1, 5000),
                                  rng.randrange(2, 2 * cluster_size + 9000))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        elif choice < 0.55:  # large
            offset, length = clip(rng.randrange(size),
                                  rng.randrange(cluster_size, max(large, 2 * cluster_size)))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        elif choice < 0.65:  # zeros written as data: whole clusters, and not
            if rng.random() < 0.5:
                offset = rng.randrange(size) // cluster_size * cluster_size
                offset, length = clip(offset, cluster_size * rng.randrange(1, 4))
            else:
                offset, length = clip(rng.randrange(size), rng.randrange(1, 3 * cluster_size))
            ops.append(Operation("write", offset, length, seed=None))
        elif choice < 0.73:  # zero requests
            offset, length = clip(rng.randrange(size), rng.randrange(1, 4 * cluster_size))
            ops.append(Operation("zero", offset, length, may_unmap=rng.random() < 0.5))
        elif choice < 0.77:  # discard
            offset, length = clip(rng.randrange(size), rng.randrange(1, 4 * cluster_size))
            ops.append(Operation("discard", offset, length))
        elif choice < 0.87:  # the end of the disk, with its partial last cluster
            offset, length = clip(size - rng.randrange(1, 2 * cluster_size + 1), size)
            ops.append(Operation("write", offset, length,
                                 seed=None if rng.random() < 0.2 else rng.randrange(1 << 30)))
        else:  # the same cluster again and again
            hot = (spot if spot is not None else (seed * 7919) % size) // cluster_size
            offset, length = clip(hot * cluster_size + rng.randrange(cluster_size),
                                  rng.randrange(1, cluster_size))
            ops.append(Operation("write", offset, length, seed=rng.randrange(1 << 30)))
        if flush_every and i % flush_every == flush_every - 1:
            ops.append(Operation("flush"))
    ops.append(Operation("flush"))
    return ops


async def apply_workload(target: WorkloadTarget, model: bytearray, ops: list[Operation], *,
                         after: Callable[[int, Operation], Awaitable[None]] | None = None
                         ) -> None:
    """Run ``ops`` against ``target``, keeping ``model`` what the target must hold.

    ``after(i, op)`` runs after each operation that succeeded (a test that records the model
    at each flush, say).
    """
    for i, op in enumerate(ops):
        if op.kind == "write":
            data = op.data()
            await target.pwrite(op.offset, data)
            model[op.offset : op.offset + op.length] = data
        elif op.kind == "zero":
            await target.zero(op.offset, op.length, may_unmap=op.may_unmap)
            model[op.offset : op.offset + op.length] = bytes(op.length)
        elif op.kind == "discard":
            await target.discard(op.offset, op.length)
            model[op.offset : op.offset + op.length] = await target.pread(op.offset, op.length)
        elif op.kind == "flush":
            await target.flush()
        else:
            raise ValueError(f"unknown operation {op.kind!r}")
        if after is not None:
            await after(i, op)


def written_bytes(ops: list[Operation]) -> int:
    return sum(op.length for op in ops if op.kind in ("write", "zero"))


# -- checking the result with the reference tools ---------------------------------------------


def qemu_check(image: str | os.PathLike[str], fmt: str = "qcow2") -> dict[str, Any]:
    """``qemu-img check --output=json``, run in the image's directory (QEMU 7.2 resolves a
    relative external data file name against the working directory)."""
    path = Path(image).resolve()
    proc = subprocess.run([QEMU_IMG, "check", "--output=json", "-f", fmt, str(path)],
                          capture_output=True, text=True, cwd=path.parent)
    if not proc.stdout.strip():
        raise AssertionError(f"qemu-img check {path} failed:\n{proc.stderr}")
    report: dict[str, Any] = json.loads(proc.stdout)
    report["returncode"] = proc.returncode
    report["stderr"] = proc.stderr
    return report


def assert_check_clean(image: str | os.PathLike[str], *, leaks_allowed: bool = False) -> None:
    """No corruption, no check error, and (unless allowed) no leaked cluster."""
    report = qemu_check(image)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    if not leaks_allowed:
        assert report.get("leaks", 0) == 0, report


def assert_same_as_model(image: str | os.PathLike[str], model: bytes | bytearray,
                         scratch: str | os.PathLike[str], fmt: str = "qcow2") -> None:
    """``qemu-img compare`` of the image (as QEMU reads it) against the raw model."""
    path = Path(image).resolve()
    expected = Path(scratch).resolve()
    expected.write_bytes(model)
    proc = subprocess.run([QEMU_IMG, "compare", "-f", fmt, "-F", "raw", str(path),
                           str(expected)], capture_output=True, text=True, cwd=path.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
