"""Crash safety of qcow2 writes, without processes: a :class:`~tests.support.faulty.FaultyFile`
between the qcow2 node and its file stops everything after the N-th write, as if the process had
been killed there, and then builds the file a power cut could leave (everything flushed, plus any
subset of the writes since). For many N: ``qemu-img check`` finds no corruption (leaks are
allowed), and every byte written before the last completed flush, and not since, reads back --
through QEMU. Lazy refcounts leave the image dirty instead, which opening it for writing
repairs. Running out of space is an error to the writer and leaves a consistent image."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.crash import CrashModel
from tests.support.faulty import LAST, SUFFIX, CrashedError, FaultyFile, crash_images, open_faulty
from tests.support.images import qemu_img, qemu_io, reference_raw
from tests.support.qcow2_images import Qcow2Images
from tests.support.workload import (
    Operation,
    assert_clean,
    assert_same_as_model,
    make_discard_workload,
    make_workload,
    qemu_check,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.drivers.format.qcow2 import Qcow2Node
from vdiskfs.errors import NoSpaceError, VdiskError

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="session")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2-crash"))


async def _workload_until_crash(path: Path, ops: list[Operation], crash_after: int | None,
                                initial: bytes) -> tuple[CrashModel, FaultyFile, bool]:
    node, faulty = await open_faulty(path, Qcow2Node, crash_after=crash_after)
    run = CrashModel(initial, faulty)
    try:
        for op in ops:
            await run.apply(node, op)
    except CrashedError:
        pass
    finally:
        # Once crashed, closing writes nothing more: the filter refuses it. (Closing may also
        # be where the crash happens: writing back, or clearing the dirty bit.)
        with contextlib.suppress(CrashedError):
            await node.aclose()
    return run, faulty, faulty.crashed


def _crash_image(directory: Path, name: str, content: bytes) -> Path:
    # Beside the original, so that a relative backing file name still resolves.
    path = directory / name
    path.write_bytes(content)
    return path


async def _sweep(image: Path, work: Path, *, seed: int, count: int = 0, crashes: int | None,
                 subsets: int = 2, lazy: bool = False,
                 ops: list[Operation] | None = None, check_final: bool = False) -> int:
    """Run a workload once (``ops``, or ``count`` operations of :func:`make_workload`),
    logging every write and sync below the qcow2 node; then check the power-cut images of
    ``crashes`` points of it (before each sync, where most is in flight, and elsewhere; None:
    before every write and every sync, and after the last), ``subsets`` random ones each.
    ``check_final``: the image the run left is clean, without a leak, and QEMU reads it as
    the run's model. Returns how many images were checked."""
    initial = reference_raw(image, work / "initial.raw").read_bytes()
    # Beside the image, so that a relative backing file name still resolves.
    victim = image.parent / "victim.qcow2"
    shutil.copy(image, victim)
    node, faulty = await open_faulty(victim, Qcow2Node)
    if ops is None:
        ops = make_workload(node.size, seed, count=count,
                            cluster_size=node.header.cluster_size, flush_every=7,
                            large=256 * KiB)
    model = bytearray(initial)
    flushes: list[tuple[int, bytes]] = [(0, bytes(model))]  # (log length, model) per flush
    started: list[tuple[int, Operation]] = []  # (log length, operation) per change
    run = CrashModel(initial, faulty)
    try:
        for op in ops:
            if op.kind != "flush":
                started.append((len(faulty.log), op))
            await run.apply(node, op)
            if op.kind == "flush":
                flushes.append((len(faulty.log), bytes(run.model)))
    finally:
        await node.aclose()
    if check_final:
        assert_clean(victim, "qcow2")
        assert_same_as_model(victim, "qcow2", run.model, work / "final.raw")
    log = faulty.log
    rng = random.Random(seed)
    if crashes is None:
        points = set(range(1, len(log) + 1))
    else:
        # Just before a sync is where the most writes are in flight.
        syncs = [at for at, entry in enumerate(log) if entry is None]
        points = set(rng.sample(syncs, min(len(syncs), crashes * 2 // 3)))
        points |= set(rng.sample(range(1, len(log)), min(len(log) - 1, crashes - len(points))))
    checked = 0
    for subset in range(subsets):
        keep = (LAST, SUFFIX, 0.5)[subset % 3]
        for point, content in crash_images(faulty.initial, log, sorted(points), rng, keep):
            flushed_at, flushed = max(f for f in flushes if f[0] <= point)
            expect = CrashModel(flushed)
            expect.since = [op for at, op in started if flushed_at <= at < point]
            crashed = _crash_image(image.parent, f"crash-{point}-{subset}.qcow2", content)
            if lazy:
                await _repair_and_check(crashed, expect, work)
            else:
                report = qemu_check(crashed, "qcow2")
                assert report.get("corruptions", 0) == 0, (point, subset, report)
                assert report.get("check-errors", 0) == 0, (point, subset, report)
                expect.assert_untouched_kept(
                    reference_raw(crashed, work / "crashed.raw").read_bytes())
            crashed.unlink()
            checked += 1
    return checked


async def _repair_and_check(image: Path, run: CrashModel, work: Path) -> None:
    """A lazy-refcount image after a crash: dirty; a writable open rebuilds its refcounts."""
    node = await open_image(str(image), OpenOptions(read_only=False))
    await node.aclose()
    assert_clean(image, "qcow2")
    run.assert_untouched_kept(reference_raw(image, work / "crashed.raw").read_bytes())


@pytest.mark.parametrize("name", ["v3", "cluster_512", "extended_l2_backing", "snapshots"])
async def test_crash_anywhere(qcow2_images: Qcow2Images, name: str, tmp_path: Path) -> None:
    image = qcow2_images.copy(name, tmp_path)
    checked = await _sweep(image, tmp_path, seed=1, count=40, crashes=20)
    assert checked >= 30


@pytest.mark.slow
@pytest.mark.parametrize("name", ["refcount_1", "refcount_64", "chain_3", "zlib_write", "v2",
                                  "cluster_2m", "zstd_convert"])
async def test_crash_anywhere_more(qcow2_images: Qcow2Images, name: str,
                                   tmp_path: Path) -> None:
    image = qcow2_images.copy(name, tmp_path)
    await _sweep(image, tmp_path, seed=2, count=60, crashes=30, subsets=3)


# -- discard and write-zeroes --------------------------------------------------------------------

#: Images for the discard and write-zeroes sweep: ``qemu-img create -o`` options, and whether
#: the image has a backing file. Each holds data, compressed clusters sharing host clusters,
#: an allocated zero cluster, a zero cluster and a partial last cluster.
DISCARD_IMAGES = {
    "v3": ("compat=1.1", False),
    "v2": ("compat=0.10", False),
    "extended_l2_backing": ("extended_l2=on", True),
    "v3_backing": ("compat=1.1", True),
    "v2_backing": ("compat=0.10", True),
    "extended_l2": ("extended_l2=on", False),
    "cluster_4k": ("cluster_size=4k,refcount_bits=2", False),
    "lazy": ("lazy_refcounts=on", False),
}
_DISCARD_SIZE = 1 * MiB + 40 * KiB


def _discard_image(directory: Path, name: str) -> Path:
    options, backed = DISCARD_IMAGES[name]
    image = directory / "disk.qcow2"
    if backed:
        base = directory / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, str(_DISCARD_SIZE))
        qemu_io(base, f"write -q -P 0x11 0 {_DISCARD_SIZE}")
        qemu_img("create", "-q", "-f", "qcow2", "-o", options, "-b", base.name, "-F", "qcow2",
                 image, str(_DISCARD_SIZE))
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", options, image, str(_DISCARD_SIZE))
    commands = ["write -q -P 0x22 0 384k"]
    commands += [f"write -q -c -P {0x30 + i} {384 + 64 * i}k 64k" for i in range(4)]
    commands += ["write -q -P 0x44 640k 64k", "write -q -z 640k 64k",  # allocated zero
                 "write -q -z 704k 64k", f"write -q -P 0x55 1M {40 * KiB}"]
    qemu_io(image, *commands)
    return image


async def _discard_sweep(tmp_path: Path, name: str, *, seed: int, count: int,
                         subsets: int) -> int:
    image = _discard_image(tmp_path, name)
    work = tmp_path / "work"
    work.mkdir()
    cluster_size = 4 * KiB if "cluster_size=4k" in DISCARD_IMAGES[name][0] else 64 * KiB
    subcluster = cluster_size // 32 if "extended_l2" in name else None
    ops = make_discard_workload(_DISCARD_SIZE, seed, cluster_size=cluster_size, count=count,
                                subcluster=subcluster)
    assert {op.kind for op in ops} == {"write", "zero", "discard", "flush"}
    return await _sweep(image, work, seed=seed, crashes=None, subsets=subsets, ops=ops,
                        lazy=name == "lazy", check_final=True)


@pytest.mark.parametrize("name", ["v3", "extended_l2_backing"])
async def test_discard_and_zero_crash_at_every_point(name: str, tmp_path: Path) -> None:
    """Discards and zero requests free clusters (refcounts drop, host clusters are punched)
    and later writes reuse them: a power cut before any write or sync of the run leaves an
    image with no corruption (leaks allowed) whose flushed bytes all survive."""
    checked = await _discard_sweep(tmp_path, name, seed=21, count=16, subsets=2)
    assert checked >= 60


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DISCARD_IMAGES))
async def test_discard_and_zero_crash_at_every_point_more(name: str, tmp_path: Path) -> None:
    await _discard_sweep(tmp_path, name, seed=22, count=40, subsets=3)


async def test_a_killed_run_is_one_of_the_logged_crashes(qcow2_images: Qcow2Images,
                                                         tmp_path: Path) -> None:
    """Killing the run for real (every request refused after the N-th write) leaves exactly
    what the log of an uninterrupted run says it would: the sweep above checks the real
    thing."""
    image = qcow2_images.copy("v3", tmp_path)
    ops = make_workload(4 * MiB, 5, count=20, flush_every=5, large=256 * KiB)
    initial = reference_raw(image, tmp_path / "initial.raw").read_bytes()
    full = image.parent / "full.qcow2"
    shutil.copy(image, full)
    _run, reference, crashed = await _workload_until_crash(full, ops, None, initial)
    assert not crashed
    writes = [at for at, entry in enumerate(reference.log) if entry is not None]
    for crash_after in (3, len(writes) // 2, len(writes) - 2):
        killed = image.parent / "killed.qcow2"
        shutil.copy(image, killed)
        _run, faulty, crashed = await _workload_until_crash(killed, ops, crash_after, initial)
        assert crashed
        point = writes[crash_after]  # the write that was refused
        assert faulty.log == reference.log[:point]
        [(_, logged)] = crash_images(reference.initial, reference.log, [point],
                                     random.Random(9), keep=1.0)
        assert faulty.crash_image(random.Random(9), keep=1.0) == logged
        report = qemu_check(_crash_image(image.parent, "c.qcow2", logged), "qcow2")
        assert report.get("corruptions", 0) == 0, report


async def test_crash_while_the_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters, 64-bit refcounts: new refcount blocks and a refcount table that moves
    (the header switched to it) in the middle of the run."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", image,
             "6M")
    # The first table's 64 blocks cover 2 MiB of file: start just short of that.
    qemu_io(image, "write -q -P 0x21 0 1900k")
    work = tmp_path / "work"
    work.mkdir()
    await _sweep(image, work, seed=4, count=30, crashes=30)


async def test_crash_with_lazy_refcounts_is_repaired(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", image,
             "3M")
    qemu_io(image, "write -q -P 0x33 0 1M")
    work = tmp_path / "work"
    work.mkdir()
    await _sweep(image, work, seed=3, count=30, crashes=10, lazy=True)


async def test_lazy_crash_leaves_the_image_dirty(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", image, "3M")
    node, faulty = await open_faulty(image, Qcow2Node)
    flushed = random.Random(1).randbytes(200_000)
    await node.pwrite(1000, flushed)
    await node.flush()
    await node.pwrite(2 * MiB, b"x" * 100)
    faulty.crashed = True  # killed here
    with contextlib.suppress(CrashedError):
        await node.aclose()
    crashed = _crash_image(tmp_path, "crashed.qcow2", faulty.crash_image(random.Random(1), 1.0))
    # Read-only: readable as is, and untouched.
    before = crashed.read_bytes()
    node = await open_image(str(crashed))
    assert node.info()["dirty-flag"] is True
    await node.pread(0, node.size)
    await node.aclose()
    assert crashed.read_bytes() == before
    # Writable: repaired first, then clean.
    node = await open_image(str(crashed), OpenOptions(read_only=False))
    assert node.stats_snapshot().driver["refcount_rebuilds"] == 1
    assert await node.pread(1000, len(flushed)) == flushed
    await node.aclose()
    assert_clean(crashed, "qcow2")


# -- out of space --------------------------------------------------------------------------------


async def test_out_of_space_is_an_error_and_the_image_stays_valid(
        qcow2_images: Qcow2Images, tmp_path: Path) -> None:
    path = qcow2_images.copy("chain_3", tmp_path)
    limit = path.stat().st_size + 300 * KiB
    node, _faulty = await open_faulty(path, Qcow2Node, space_limit=limit)
    rng = random.Random(7)
    with pytest.raises(NoSpaceError):
        for _ in range(200):
            await node.pwrite(rng.randrange(node.size - 70_000), rng.randbytes(70_000))
    # Writes in place still work, and the node keeps serving reads.
    await node.pread(0, node.size)
    with contextlib.suppress(NoSpaceError):
        await node.aclose()
    assert_clean(path, "qcow2", leaks_allowed=True)


def _can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a tmpfs")
async def test_host_out_of_space_on_a_small_tmpfs(tmp_path: Path) -> None:
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        path = mountpoint / "disk.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, "64M")
        node = await open_image(str(path), OpenOptions(read_only=False))
        rng = random.Random(8)
        with pytest.raises(NoSpaceError):
            for i in range(100):
                await node.pwrite(i * 1 * MiB + 4096, rng.randbytes(300 * KiB))
                if i % 4 == 3:
                    await node.flush()
        with contextlib.suppress(VdiskError):
            await node.aclose()
        report = qemu_check(path, "qcow2")
        assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
