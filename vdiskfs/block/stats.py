"""Per-node I/O accounting, cheap enough to be always on.

Modelled on QEMU's ``include/block/accounting.h``: per-operation arrays of operation counts,
bytes, failed and invalid requests and total time, plus a latency histogram. QEMU keeps these per
attached disk; vdiskfs keeps them for every node of every tree, so each layer of an image (the
qcow2 mapping, the file below it, the backing file...) shows what it did.

Field names follow QEMU's ``BlockDeviceStats`` (``rd_bytes``, ``wr_operations``,
``failed_flush_operations``, ...) where QEMU has one; vdiskfs adds ``zero_*`` and
``block_status_*`` because it counts write-zeroes and block-status requests separately.

Cost: one ``perf_counter_ns`` pair and a handful of list stores per request (measured by
``scripts/bench/stats_overhead.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

__all__ = ["HISTOGRAM_BOUNDARIES_NS", "Counters", "NodeStats", "Op", "StatsSnapshot"]


class Op(IntEnum):
    """The accounted operations of the BlockNode contract."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    ZERO = 3
    DISCARD = 4
    BLOCK_STATUS = 5


# QEMU's prefixes: rd_, wr_, flush_, unmap_ (discard). zero_ and block_status_ are vdiskfs's own.
_PREFIX = {
    Op.READ: "rd",
    Op.WRITE: "wr",
    Op.FLUSH: "flush",
    Op.ZERO: "zero",
    Op.DISCARD: "unmap",
    Op.BLOCK_STATUS: "block_status",
}
_HAS_BYTES = frozenset({Op.READ, Op.WRITE, Op.ZERO, Op.DISCARD})

# Latency histogram: bin i counts requests with latency < HISTOGRAM_BOUNDARIES_NS[i] (and >= the
# previous boundary); the last bin counts everything slower. Powers of four from 1 us to ~1 s,
# so the bin index is derived from bit_length() without a search.
HISTOGRAM_BOUNDARIES_NS: tuple[int, ...] = tuple(1 << (10 + 2 * i) for i in range(11))
_NBINS = len(HISTOGRAM_BOUNDARIES_NS) + 1
_NOPS = len(Op)
_now = time.perf_counter_ns


def _bin(elapsed_ns: int) -> int:
    # Latencies below 1 << 10 have at most 10 bits: bin 0. Each further bin spans two bits:
    # 11-12 bits -> 1, 13-14 -> 2, ...
    index = (elapsed_ns.bit_length() - 9) >> 1
    if index < 0:
        return 0
    return index if index < _NBINS else _NBINS - 1


class Counters:
    """Base for a driver's own counters: subclass as a ``@dataclass`` with int fields, or
    fields that are groups of counters themselves (a :class:`Counters` dataclass, such as the
    counters of one of the node's caches).

    Drivers bump attributes directly (``self.counters.data_reads += 1``,
    ``self.counters.l2_cache.hits += 1``), never by name in a string: the type checker then
    knows every counter.
    """

    def snapshot(self) -> dict[str, int]:
        """The counters by field name; a group field ``g`` gives ``g_NAME`` for each of its
        own (``l2_cache_hits``): the names stay flat, as QEMU's and Firecracker's are."""
        out: dict[str, int] = {}
        if not dataclasses.is_dataclass(self):
            return out
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Counters):
                for name, n in value.snapshot().items():
                    out[f"{f.name}_{name}"] = n
            else:
                out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """The counters of one node at one instant."""

    ops: tuple[int, ...]
    bytes: tuple[int, ...]
    failed: tuple[int, ...]
    invalid: tuple[int, ...]
    total_time_ns: tuple[int, ...]
    histograms: tuple[tuple[int, ...], ...]
    in_flight: int
    max_in_flight: int
    wr_highest_offset: int
    idle_time_ns: int
    driver: dict[str, int | str]  # ints but for a few names (file: io_engine)

    def as_dict(self) -> dict[str, Any]:
        """Flat QEMU-style field names, then the driver's own counters."""
        out: dict[str, Any] = {}
        for op in Op:
            prefix = _PREFIX[op]
            if op in _HAS_BYTES:
                out[f"{prefix}_bytes"] = self.bytes[op]
            out[f"{prefix}_operations"] = self.ops[op]
            out[f"failed_{prefix}_operations"] = self.failed[op]
            out[f"invalid_{prefix}_operations"] = self.invalid[op]
            out[f"{prefix}_total_time_ns"] = self.total_time_ns[op]
        out["wr_highest_offset"] = self.wr_highest_offset
        out["in_flight"] = self.in_flight
        out["max_in_flight"] = self.max_in_flight
        out["idle_time_ns"] = self.idle_time_ns
        out["latency_histogram_boundaries_ns"] = list(HISTOGRAM_BOUNDARIES_NS)
        for op in Op:
            out[f"{_PREFIX[op]}_latency_histogram"] = list(self.histograms[op])
        out.update(self.driver)
        return out


class NodeStats:
    """Mutable accounting for one node; only :class:`~vdiskfs.block.node.BlockNode` writes it."""

    __slots__ = (
        "_last_done_ns",
        "bytes",
        "failed",
        "histograms",
        "in_flight",
        "invalid",
        "max_in_flight",
        "ops",
        "total_time_ns",
        "wr_highest_offset",
    )

    def __init__(self) -> None:
        self.ops = [0] * _NOPS
        self.bytes = [0] * _NOPS
        self.failed = [0] * _NOPS
        self.invalid = [0] * _NOPS
        self.total_time_ns = [0] * _NOPS
        self.histograms = [[0] * _NBINS for _ in range(_NOPS)]
        self.in_flight = 0
        #: The most requests this node has had in flight at once (its queue depth high mark).
        self.max_in_flight = 0
        self.wr_highest_offset = 0
        self._last_done_ns = time.perf_counter_ns()

    def start(self) -> int:
        """Begin a request; returns the cookie to hand to :meth:`done` or :meth:`fail`."""
        in_flight = self.in_flight = self.in_flight + 1
        if in_flight > self.max_in_flight:
            self.max_in_flight = in_flight
        return _now()

    def done(self, op: int, nbytes: int, cookie: int) -> None:
        # The hot path of every request: plain ints and local names only.
        now = _now()
        elapsed = now - cookie
        self.in_flight -= 1
        self.ops[op] += 1
        self.bytes[op] += nbytes
        self.total_time_ns[op] += elapsed
        self.histograms[op][_bin(elapsed)] += 1
        self._last_done_ns = now

    def fail(self, op: int, cookie: int) -> None:
        now = _now()
        self.in_flight -= 1
        self.failed[op] += 1
        self.total_time_ns[op] += now - cookie
        self._last_done_ns = now

    def invalid_request(self, op: Op) -> None:
        self.invalid[op] += 1

    def snapshot(self, driver: Mapping[str, int | str] | None = None) -> StatsSnapshot:
        idle = 0 if self.in_flight else time.perf_counter_ns() - self._last_done_ns
        return StatsSnapshot(
            ops=tuple(self.ops),
            bytes=tuple(self.bytes),
            failed=tuple(self.failed),
            invalid=tuple(self.invalid),
            total_time_ns=tuple(self.total_time_ns),
            histograms=tuple(tuple(h) for h in self.histograms),
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            wr_highest_offset=self.wr_highest_offset,
            idle_time_ns=idle,
            driver=dict(driver or {}),
        )
