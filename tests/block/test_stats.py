from __future__ import annotations

import dataclasses
import json

from vdiskfs.block.registry import driver_names
from vdiskfs.block.stats import HISTOGRAM_BOUNDARIES_NS, Counters, NodeStats, Op, _bin
from vdiskfs.drivers.format.qcow2 import Qcow2Counters


def test_histogram_bins_follow_boundaries() -> None:
    assert _bin(0) == 0
    assert _bin(HISTOGRAM_BOUNDARIES_NS[0] - 1) == 0
    for i, boundary in enumerate(HISTOGRAM_BOUNDARIES_NS):
        assert _bin(boundary) == i + 1, boundary
        assert _bin(boundary - 1) == i
    assert _bin(10**15) == len(HISTOGRAM_BOUNDARIES_NS)


def test_accounting_and_snapshot_names() -> None:
    stats = NodeStats()
    cookie = stats.start()
    assert stats.in_flight == 1
    stats.done(Op.READ, 4096, cookie)
    stats.fail(Op.WRITE, stats.start())
    stats.invalid_request(Op.DISCARD)
    snap = stats.snapshot({"l2_cache_hits": 3}).as_dict()
    assert snap["rd_operations"] == 1 and snap["rd_bytes"] == 4096
    assert snap["failed_wr_operations"] == 1 and snap["wr_operations"] == 0
    assert snap["invalid_unmap_operations"] == 1
    assert snap["in_flight"] == 0 and snap["l2_cache_hits"] == 3
    assert snap["max_in_flight"] == 1
    assert sum(snap["rd_latency_histogram"]) == 1
    assert "flush_bytes" not in snap  # QEMU has no bytes for flush
    json.dumps(snap)  # plain JSON types only


def test_max_in_flight_is_the_high_water_mark() -> None:
    stats = NodeStats()
    cookies = [stats.start() for _ in range(5)]
    for cookie in cookies[:4]:
        stats.done(Op.READ, 1, cookie)
    stats.fail(Op.READ, cookies[4])
    stats.done(Op.READ, 1, stats.start())
    assert stats.in_flight == 0 and stats.max_in_flight == 5
    assert stats.snapshot().as_dict()["max_in_flight"] == 5


def _counter_classes(cls: type[Counters]) -> list[type[Counters]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _counter_classes(sub)
    return out


def test_driver_counters_never_shadow_the_node_counters() -> None:
    """A snapshot puts the driver's counters beside the node's in one flat object: a driver
    field named like a node counter would hide it (the run counters' ``zero_bytes`` once hid
    the write-zeroes bytes of every format node)."""
    driver_names()  # import every format driver
    import vdiskfs.drivers.protocol.file  # noqa: F401

    node_keys = set(NodeStats().snapshot().as_dict())
    classes = [c for c in _counter_classes(Counters) if dataclasses.is_dataclass(c)]
    assert len(classes) > 5
    for cls in classes:
        clash = set(cls().snapshot()) & node_keys
        assert not clash, (cls.__qualname__, clash)


def test_a_group_of_counters_is_shown_flat_under_its_field_name() -> None:
    """qcow2 counts each cache in a group of typed fields; the statistics keep QEMU-style flat
    names (``l2_cache_hits``), in field order."""
    counters = Qcow2Counters()
    counters.l2_cache.hits += 2
    counters.refcount_cache.writebacks += 1
    counters.refcount_rebuilds += 1
    snap = counters.snapshot()
    assert snap["l2_cache_hits"] == 2 and snap["l2_cache_misses"] == 0
    assert snap["refcount_cache_writebacks"] == 1 and snap["refcount_rebuilds"] == 1
    assert "l2_cache" not in snap and all(isinstance(v, int) for v in snap.values())
    keys = list(snap)
    assert keys.index("l2_cache_hits") < keys.index("compressed_clusters_read")
