"""qed writes: cluster and L2 table allocation, copy-on-write from raw and qcow2 backing files,
zero clusters, the need-check flag and the repair of a writable open; checked with qemu-img
check and compare after the shared random workload, and after simulated crashes."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.crash import run_crash
from tests.support.hostile import patch, read_field, set_bits
from tests.support.images import create, qemu_img, qemu_io, random_bytes, reference_raw, sha256_file
from tests.support.workload import (
    assert_clean,
    assert_qemu_agrees,
    assert_same_as_model,
    assert_use_changes_nothing,
    make_block_workload,
    qemu_check,
    qemu_compare,
    qemu_repaired_copy,
    run_workload_checked,
    write_reference,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.drivers.format.qed import F_NEED_CHECK, QedNode
from vdiskfs.errors import FormatError, UnsupportedError

MIB = 1 << 20
KIB = 1 << 10
FEATURES, AUTOCLEAR, L1_OFFSET = 16, 32, 40  # header field offsets


@pytest.fixture(scope="session")
def qed_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Pre-filled images (writes hit allocated, unallocated and zero clusters, and regions
    without an L2 table) with the cluster size each test straddles."""
    d = tmp_path_factory.mktemp("qed-write")
    images: dict[str, tuple[Path, int]] = {}
    plain = create(d / "plain.qed", 9 * MIB, "qed")
    qemu_io(plain, "write -P 0xab 64k 64k", "write -z 1M 256k", "write -P 0x33 7M 100k",
            fmt="qed")
    images["plain"] = (plain, 64 * KIB)
    # 4 KiB clusters, two-cluster tables (QEMU 7.2 rejects one): an L2 table maps 4 MiB; the
    # last of the four has none yet.
    small = create(d / "small.qed", 16 * MIB, "qed", cluster_size=4096, table_size=2)
    qemu_io(small, "write -P 0x12 0 12k", "write -P 0x13 5M 300k", "write -z 9M 8k", fmt="qed")
    images["4k-clusters"] = (small, 4 * KIB)
    # 1 MiB clusters and a partial last cluster.
    big = create(d / "big.qed", 8 * MIB + 1536, "qed", cluster_size=MIB)
    qemu_io(big, "write -P 0x21 0 1536k", fmt="qed")
    images["1m-clusters"] = (big, MIB)
    (d / "base.raw").write_bytes(random_bytes(11, 6 * MIB))  # shorter than the image
    backed = create(d / "raw-backing.qed", 8 * MIB, "qed", backing="base.raw",
                    backing_fmt="raw")
    qemu_io(backed, "write -P 0x66 1M 4k", "write -z 2M 128k", "write -P 0x77 4M 64k",
            fmt="qed")
    images["raw-backing"] = (backed, 64 * KIB)
    base = create(d / "base.qcow2", 8 * MIB, "qcow2")
    qemu_io(base, "write -P 0x31 0 5M", "write -P 0x32 7M 1M", fmt="qcow2")
    qcow2_backed = create(d / "qcow2-backing.qed", 8 * MIB, "qed", backing="base.qcow2",
                          backing_fmt="qcow2", cluster_size=16 * KIB)
    qemu_io(qcow2_backed, "write -P 0x41 100k 20k", fmt="qed")
    images["qcow2-backing"] = (qcow2_backed, 16 * KIB)
    images["empty"] = (create(d / "empty.qed", 6 * MIB, "qed"), 64 * KIB)
    return images


VARIANTS = ["plain", "4k-clusters", "1m-clusters", "raw-backing", "qcow2-backing", "empty"]


def _copy(templates: dict[str, tuple[Path, int]], variant: str,
          tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the template next to copies of its backing files, and QEMU's raw view."""
    source, _ = templates[variant]
    for sibling in source.parent.iterdir():
        if sibling.name.startswith("base."):
            shutil.copyfile(sibling, tmp_path / sibling.name)
    path = tmp_path / source.name
    shutil.copyfile(source, path)
    return path, reference_raw(path, tmp_path / f"{variant}.raw", "qed")


async def _open_rw(path: Path, **options: object) -> QedNode:
    node = await open_image(str(path), OpenOptions(read_only=False, format="qed",
                                                   **options))  # type: ignore[arg-type]
    assert isinstance(node, QedNode)
    return node


def _features(path: Path) -> int:
    return read_field(path, FEATURES, "<Q")



@pytest.mark.parametrize("variant", VARIANTS)
async def test_workload_matches_qemu(qed_templates: dict[str, tuple[Path, int]], variant: str,
                                     tmp_path: Path) -> None:
    path, reference = _copy(qed_templates, variant, tmp_path)
    ops = make_block_workload(reference.stat().st_size, seed=len(variant),
                              unit=qed_templates[variant][1])
    node = await run_workload_checked(path, "qed", ops, reference)
    counters = node.counters
    assert counters.clusters_allocated > 0
    if variant == "4k-clusters":
        assert counters.l2_tables_allocated > 0
    if "backing" in variant:
        assert counters.need_check_set == 0  # QEMU: the flush before the L2 update
    else:
        assert counters.need_check_set == 1
    assert not _features(path) & F_NEED_CHECK


@pytest.mark.parametrize("variant", VARIANTS)
async def test_conformance_writable(qed_templates: dict[str, tuple[Path, int]], variant: str,
                                    tmp_path: Path) -> None:
    path, reference = _copy(qed_templates, variant, tmp_path)
    await check_block_node(lambda: _open_rw(path), reference.read_bytes(), writable=True)
    assert_clean(path, "qed")


@pytest.mark.parametrize("variant", [*VARIANTS, "need-check"])
async def test_read_only_open_changes_nothing(qed_templates: dict[str, tuple[Path, int]],
                                              variant: str, tmp_path: Path) -> None:
    path, _ = _copy(qed_templates, "plain" if variant == "need-check" else variant, tmp_path)
    if variant == "need-check":
        set_bits(path, FEATURES, "<Q", F_NEED_CHECK)
    await assert_use_changes_nothing(path)


async def test_writable_open_without_writes_changes_nothing(
        qed_templates: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    path, _ = _copy(qed_templates, "raw-backing", tmp_path)
    await assert_use_changes_nothing(path, writable=True, fmt="qed")


async def test_need_check_flag_lifecycle(qed_templates: dict[str, tuple[Path, int]],
                                         tmp_path: Path) -> None:
    """Set (on disk) before the first allocation, kept by flushes during the burst, cleared
    by a flush once the burst is over and by close: QEMU's timer, without a timer."""
    path, _ = _copy(qed_templates, "plain", tmp_path)
    node = await _open_rw(path)
    try:
        await node.pwrite(64 * KIB + 100, b"in place, no allocation")
        assert not _features(path) & F_NEED_CHECK
        await node.pwrite(5 * MIB + 3, b"\x01" * 10)
        assert _features(path) & F_NEED_CHECK
        assert node.info()["dirty-flag"] is True
        await node.flush()
        assert _features(path) & F_NEED_CHECK  # within QEMU's 5 s after the allocation
        node.need_check_delay = 0
        await node.flush()
        assert not _features(path) & F_NEED_CHECK
        assert node.counters.need_check_cleared == 1
        assert_clean(path, "qed", "-U")  # and QEMU agrees while we hold the image
        await node.pwrite(6 * MIB + 3, b"\x02" * 10)
        assert _features(path) & F_NEED_CHECK
        assert node.counters.need_check_set == 2
    finally:
        await node.aclose()
    assert not _features(path) & F_NEED_CHECK


def _l2_entry_offset(path: Path, cluster: int) -> int:
    data = path.read_bytes()
    l1 = struct.unpack_from("<Q", data, L1_OFFSET)[0]
    l2 = struct.unpack_from("<Q", data, l1)[0]
    return int(l2 + 8 * cluster)


async def test_writable_open_repairs_need_check(qed_templates: dict[str, tuple[Path, int]],
                                                tmp_path: Path) -> None:
    """A crash between growing the L2 table and writing the cluster, on a reordering disk:
    the entry points past the end of the file. A writable open clears it (QEMU's qed_check
    with fix), then the flag."""
    path, reference = _copy(qed_templates, "plain", tmp_path)
    set_bits(path, FEATURES, "<Q", F_NEED_CHECK)
    patch(path, _l2_entry_offset(path, 3), "<Q", path.stat().st_size + 640 * KIB)
    result = qemu_check(path, "qed")
    assert result["corruptions"] == 1
    node = await _open_rw(path)
    try:
        assert node.counters.entries_repaired == 1
        assert any("cleared 1 table entries" in w for w in node.warnings)
        assert not _features(path) & F_NEED_CHECK
        assert await node.pread(0, node.size) == reference.read_bytes()
    finally:
        await node.aclose()
    assert_qemu_agrees(path, "qed", reference)


async def test_cluster_used_twice_refused(qed_templates: dict[str, tuple[Path, int]],
                                          tmp_path: Path) -> None:
    path, _ = _copy(qed_templates, "plain", tmp_path)
    used = struct.unpack_from("<Q", path.read_bytes(), _l2_entry_offset(path, 1))[0]
    patch(path, _l2_entry_offset(path, 5), "<Q", used)
    set_bits(path, FEATURES, "<Q", F_NEED_CHECK)
    digest = sha256_file(path)
    with pytest.raises(FormatError, match="used twice"):
        await _open_rw(path)
    assert sha256_file(path) == digest  # the flag stays set
    node = await open_image(str(path))  # read-only still reads it
    await node.aclose()


async def test_zero_clusters_over_backing(qed_templates: dict[str, tuple[Path, int]],
                                          tmp_path: Path) -> None:
    """Whole clusters become zero clusters (no data written); a partial write into one later
    fills the rest of its new cluster with zeros, not with the backing file's bytes."""
    path, reference = _copy(qed_templates, "raw-backing", tmp_path)
    size = path.stat().st_size
    node = await _open_rw(path)
    try:
        await node.zero(3 * MIB, 3 * 64 * KIB)
        assert node.counters.zero_clusters_marked == 3
        assert node.counters.clusters_allocated == 0
        assert path.stat().st_size == size
        await node.zero(3 * MIB + 200 * KIB, 10)  # partial, over the backing file: allocates
        assert node.counters.clusters_allocated == 1
        await node.pwrite(3 * MIB + 64 * KIB + 100, b"\xee" * 50)
        assert await node.pread(3 * MIB + 64 * KIB, 100) == bytes(100)
        assert (await node.block_status(3 * MIB, 64 * KIB))[0] & 2  # still a zero cluster
    finally:
        await node.aclose()
    write_reference(reference, 3 * MIB, bytes(3 * 64 * KIB))
    write_reference(reference, 3 * MIB + 200 * KIB, bytes(10))
    write_reference(reference, 3 * MIB + 64 * KIB + 100, b"\xee" * 50)
    assert_qemu_agrees(path, "qed", reference)


async def test_zero_without_backing_allocates_nothing(
        qed_templates: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    path, reference = _copy(qed_templates, "plain", tmp_path)
    node = await _open_rw(path)
    try:
        await node.zero(2 * MIB + 5, 3 * MIB)
        assert node.counters.clusters_allocated == 0
        assert node.counters.zero_clusters_marked == 0
    finally:
        await node.aclose()
    write_reference(reference, 2 * MIB + 5, bytes(3 * MIB))
    assert_qemu_agrees(path, "qed", reference)


async def test_copy_on_write_from_backing(qed_templates: dict[str, tuple[Path, int]],
                                          tmp_path: Path) -> None:
    path, reference = _copy(qed_templates, "qcow2-backing", tmp_path)
    node = await _open_rw(path)
    try:
        await node.pwrite(2 * MIB + 1000, b"\x99" * 10)
        assert node.counters.cow_bytes == 16 * KIB - 10
        assert node.counters.clusters_allocated == 1
    finally:
        await node.aclose()
    write_reference(reference, 2 * MIB + 1000, b"\x99" * 10)
    assert_qemu_agrees(path, "qed", reference)
    # The cluster holds the backing file's bytes around the write: drop the backing file.
    qemu_img("rebase", "-u", "-b", "", path)
    qemu_img("convert", "-f", "qed", "-O", "raw", path, tmp_path / "alone.raw")
    alone = (tmp_path / "alone.raw").read_bytes()
    assert alone[2 * MIB : 2 * MIB + 16 * KIB] == reference.read_bytes()[2 * MIB :
                                                                         2 * MIB + 16 * KIB]


async def test_writing_without_backing_refused(qed_templates: dict[str, tuple[Path, int]],
                                               tmp_path: Path) -> None:
    path, _ = _copy(qed_templates, "raw-backing", tmp_path)
    with pytest.raises(UnsupportedError, match="without it"):
        await _open_rw(path, backing=False)


async def test_autoclear_bits_knocked_out(qed_templates: dict[str, tuple[Path, int]],
                                          tmp_path: Path) -> None:
    path, _ = _copy(qed_templates, "plain", tmp_path)
    set_bits(path, AUTOCLEAR, "<Q", 0x5)
    node = await _open_rw(path)
    await node.aclose()
    with open(path, "rb") as f:
        f.seek(AUTOCLEAR)
        assert struct.unpack("<Q", f.read(8))[0] == 0


def _accept_leaks_only(result: dict[str, object]) -> None:
    assert not result.get("corruptions"), result
    assert not result.get("check-errors"), result


async def _crash(templates: dict[str, tuple[Path, int]], variant: str, budget: int,
                 tmp_path: Path) -> None:
    path, _ = _copy(templates, variant, tmp_path)
    got, _ = await run_crash(path, QedNode, budget=budget, seed=budget,
                             unit=templates[variant][1])
    ours = tmp_path / "ours.raw"
    assert_same_as_model(path, "qed", got, ours)  # QEMU reads the crashed image as we do
    # A crash leaks clusters at worst; no entry points anywhere wrong.
    _accept_leaks_only(qemu_check(path, "qed"))
    if _features(path) & F_NEED_CHECK:
        assert variant != "raw-backing"  # QEMU never sets it with a backing file
        repaired = qemu_repaired_copy(path, "qed", _accept_leaks_only)
        qemu_compare(repaired, "qed", ours)
        # vdiskfs's own repair on a writable open agrees.
        node = await _open_rw(path)
        await node.aclose()
        assert not _features(path) & F_NEED_CHECK
        _accept_leaks_only(qemu_check(path, "qed"))
        qemu_compare(path, "qed", ours)


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 8, 12, 17, 25, 40, 60])
@pytest.mark.parametrize("variant", ["4k-clusters", "raw-backing"])
async def test_crash_keeps_flushed_data(qed_templates: dict[str, tuple[Path, int]],
                                        variant: str, budget: int, tmp_path: Path) -> None:
    await _crash(qed_templates, variant, budget, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("budget", range(0, 75))
@pytest.mark.parametrize("variant", ["4k-clusters", "raw-backing"])
async def test_crash_after_every_write(qed_templates: dict[str, tuple[Path, int]],
                                       variant: str, budget: int, tmp_path: Path) -> None:
    await _crash(qed_templates, variant, budget, tmp_path)
