"""Many readers and writers at once on every format, with every I/O engine (issue 9).

The host I/O of the ``file`` node goes through an asynchronous engine, so requests really are
in flight together at every layer. Each test opens an image writable and runs 64 tasks against
it, checked against a ``bytearray`` model of the guest disk:

1. *Disjoint writers, overlapping readers.* The disk is cut into stripes with unaligned
   boundaries (so neighbouring stripes share clusters, grains and blocks, and their writers race
   to allocate them); each writer owns some stripes and writes and zeroes inside them, one
   request at a time, so the final bytes are defined. Readers read anything meanwhile: a stripe
   untouched during a read reads exactly as the model; in one written during it, each byte
   reads as before or as one of the writes put it. A flusher flushes throughout.
2. *Overlapping writers, serialized per zone.* A few zones (again sharing clusters with their
   neighbours) are written by every task, overlapping one another, under one lock per zone:
   different zones are written concurrently, the same zone in the test's order.

Then the node reads whole as the model, nothing is in flight in any node or in the engine, and
after closing, ``qemu-img check`` finds nothing wrong, ``qemu-img compare`` reads the model
and so does a fresh open.
"""

from __future__ import annotations

import bisect
import random
from pathlib import Path

import pytest
import trio

from tests.support.concurrency import (
    ENGINES,
    VARIANTS,
    assert_one_of_values,
    copy_image,
    file_nodes,
    settle,
    use_engine,
)
from tests.support.workload import assert_clean, assert_image_matches, qemu_compare
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode

KiB = 1 << 10
#: Seconds a test's workload may take before it counts as hung.
TIMEOUT = 60


# -- the workload ---------------------------------------------------------------------------------


class Stripes:
    """The disk cut into stripes with unaligned ends; ``gen[i]`` counts the starts and ends of
    the writes to stripe ``i`` (odd: a write is in flight)."""

    def __init__(self, size: int, rng: random.Random, unit: int) -> None:
        longest = min(2 * unit, 160 * KiB)
        self.starts: list[int] = []
        offset = 0
        while offset < size:
            self.starts.append(offset)
            offset += rng.randrange(longest // 8, longest)
        self.ends = [*self.starts[1:], size]
        self.gen = [0] * len(self.starts)

    def __len__(self) -> int:
        return len(self.starts)

    def covering(self, offset: int, length: int) -> range:
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_left(self.starts, offset + length)
        return range(first, last)


async def disjoint_phase(node: BlockNode, model: bytearray, rng: random.Random, unit: int, *,
                         writers: int = 32, readers: int = 32) -> dict[str, int]:
    """Phase 1 of the module doc. Returns how many stripe pieces readers checked exactly and
    old-or-new (the test asserts that they checked something)."""
    size = len(model)
    stripes = Stripes(size, rng, unit)
    owned: list[list[int]] = [[] for _ in range(writers)]
    order = list(range(len(stripes)))
    rng.shuffle(order)
    for i, stripe in enumerate(order):
        owned[i % writers].append(stripe)
    checked = {"exact": 0, "old_or_new": 0}
    writing = True
    #: The model with the writes in flight applied: what the disk holds once they land.
    future = bytearray(model)

    async def writer(mine: list[int], seed: int) -> None:
        r = random.Random(seed)
        for _ in range(8):
            stripe = r.choice(mine)
            start, end = stripes.starts[stripe], stripes.ends[stripe]
            offset = r.randrange(start, end)
            length = r.randrange(1, end - offset + 1)
            choice = r.random()
            data = bytes(length) if choice < 0.25 else r.randbytes(length)
            stripes.gen[stripe] += 1
            future[offset : offset + length] = data
            if choice < 0.15:
                await node.zero(offset, length, may_unmap=r.random() < 0.5)
            else:
                await node.pwrite(offset, data)
            model[offset : offset + length] = data
            stripes.gen[stripe] += 1

    async def reader(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(10):
            offset = r.randrange(size)
            length = min(size - offset, r.randrange(1, 3 * min(2 * unit, 160 * KiB)))
            covering = stripes.covering(offset, length)
            before = [stripes.gen[s] for s in covering]
            old = bytes(model[offset : offset + length])
            old_future = bytes(future[offset : offset + length])
            got = bytes(await node.pread(offset, length))
            assert len(got) == length
            for s, gen in zip(covering, before, strict=True):
                lo = max(offset, stripes.starts[s])
                hi = min(offset + length, stripes.ends[s])
                a, b = lo - offset, hi - offset
                moved = stripes.gen[s] - gen
                if moved == 0 and gen % 2 == 0:
                    assert got[a:b] == old[a:b], f"{lo:#x}-{hi:#x} changed with no write to it"
                    checked["exact"] += 1
                elif moved <= 2:
                    # At most two writes overlapped the read, one after the other (the owner
                    # writes one at a time), and either may have landed in part: each byte is
                    # as before them, as the first wrote it or as the second.
                    assert_one_of_values(got[a:b], lo, old[a:b], old_future[a:b],
                                         bytes(model[lo:hi]), bytes(future[lo:hi]))
                    checked["old_or_new"] += 1

    async def flusher() -> None:
        while writing:
            await node.flush()
            await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher)
        async with trio.open_nursery() as workers:
            for i in range(writers):
                workers.start_soon(writer, owned[i], rng.randrange(1 << 30))
            for _ in range(readers):
                workers.start_soon(reader, rng.randrange(1 << 30))
        writing = False
    return checked


async def overlapping_phase(node: BlockNode, model: bytearray, rng: random.Random, unit: int,
                            *, tasks: int = 64, zones: int = 8) -> None:
    """Phase 2 of the module doc: zones of about 1.5 units (at most 192 KiB) with unaligned
    ends, spread over the disk."""
    size = len(model)
    span = min(unit * 3 // 2, 192 * KiB)
    bounds: list[tuple[int, int]] = []
    # Adjacent pairs of zones (sharing a unit), the pairs spread over the disk.
    for i in range(zones // 2):
        start = rng.randrange(i * size // (zones // 2), (i + 1) * size // (zones // 2) - 2 * span)
        middle = start + span - rng.randrange(1, 512)
        bounds += [(start, middle), (middle, middle + span + rng.randrange(1, 512))]
    locks = [trio.Lock() for _ in bounds]

    async def task(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(4):
            zone = r.randrange(len(bounds))
            start, end = bounds[zone]
            async with locks[zone]:
                if r.random() < 0.3:
                    got = bytes(await node.pread(start, end - start))
                    assert got == model[start:end], f"zone {start:#x}-{end:#x} differs"
                    continue
                offset = r.randrange(start, end)
                length = r.randrange(1, end - offset + 1)
                data = r.randbytes(length)
                await node.pwrite(offset, data)
                model[offset : offset + length] = data

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(task, rng.randrange(1 << 30))


# -- the test -------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(VARIANTS))
async def test_concurrent_readers_and_writers(variant_templates: dict[str, Path], name: str,
                                              engine: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    use_engine(monkeypatch, engine)
    image = copy_image(variant_templates, name, tmp_path)
    unit = VARIANTS[name].unit
    model = bytearray(image.reference.read_bytes())
    rng = random.Random(f"{name}-{engine}")
    node = await open_image(str(image.path), OpenOptions(read_only=False, format=image.fmt))
    try:
        assert node.size == len(model)
        for file in file_nodes(node):
            assert file.stats_snapshot().driver["io_engine"] == engine
        # A deadlock fails the test rather than hanging it (a run takes under a second).
        with trio.fail_after(TIMEOUT):
            checked = await disjoint_phase(node, model, rng, unit)
            assert checked["exact"] > 50, checked
            await overlapping_phase(node, model, rng, unit)
        assert bytes(await node.pread(0, node.size)) == model
        await node.flush()
        await settle(node)
        # The tasks' requests really were in flight together at the top of the tree.
        assert node.stats.max_in_flight >= 16
    finally:
        await node.aclose()
    image.reference.write_bytes(model)
    if VARIANTS[name].checkable:
        assert_clean(image.path, image.fmt)
    qemu_compare(image.path, image.fmt, image.reference)
    await assert_image_matches(image.path, image.reference)


def test_variants_cover_every_writable_format() -> None:
    """A format that learns to write joins this module (the registry knows them all)."""
    from vdiskfs.block.registry import driver_names, get_driver

    writable = {n for n in driver_names() if getattr(get_driver(n), "supports_write", False)}
    assert writable <= {v.fmt for v in VARIANTS.values()}

