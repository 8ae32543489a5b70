"""vhdx writes: fixed files in place, dynamic ones allocating payload blocks, BAT updates
journaled through the log (which QEMU replays), header GUIDs, replaying a pending log into the
file; checked with qemu-img check and compare after the shared random workload, and after
simulated crashes."""

from __future__ import annotations

import shutil
import struct
import uuid
from pathlib import Path

import pytest

from tests.support import vhdx_build as vb
from tests.support.conformance import check_block_node
from tests.support.crash import run_crash
from tests.support.faulty import CrashMode, open_faulty
from tests.support.images import (
    QEMU_IMG,
    create,
    qemu_img,
    qemu_io,
    random_bytes,
    reference_raw,
    run,
    sha256_file,
)
from tests.support.workload import (
    assert_clean,
    assert_qemu_agrees,
    assert_reads_match,
    assert_same_as_model,
    assert_use_changes_nothing,
    make_block_workload,
    qemu_compare,
    qemu_repaired_copy,
    run_workload_checked,
    write_racing,
    write_reference,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.format.vhdx import VhdxNode
from vdiskfs.drivers.format.vhdx import driver as vhdx_driver
from vdiskfs.drivers.format.vhdx.headers import HEADER_OFFSETS, NIL_GUID, VhdxHeader
from vdiskfs.errors import FormatError, UnsupportedError

MIB = 1 << 20
SIZE = 12 * MIB + 3 * 512  # a partial last block for every block size


@pytest.fixture(scope="session")
def vhdx_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Pre-filled images (writes hit present, zero and never-written blocks), with their block
    size."""
    d = tmp_path_factory.mktemp("vhdx-write")
    writes = ("write -P 0xab 64k 64k", "write -z 1M 512k", "write -P 0x33 3M 1M",
              "write -P 0x44 11M 100k")
    images: dict[str, tuple[Path, int]] = {}
    for name, options, block in [
        ("dynamic", {}, 8 * MIB),
        ("block-1m-log-1m", {"block_size": "1M", "log_size": "1M"}, MIB),
        ("block-32m", {"block_size": "32M"}, 32 * MIB),
        ("no-zero-state", {"block_state_zero": False, "block_size": "2M"}, 2 * MIB),
        # QEMU's fixed files mark their blocks ZERO (block_state_zero): writes allocate.
        ("fixed", {"subformat": "fixed", "block_size": "4M"}, 4 * MIB),
        ("fixed-present", {"subformat": "fixed", "block_size": "4M",
                           "block_state_zero": False}, 4 * MIB),
    ]:
        path = create(d / f"{name}.vhdx", SIZE, "vhdx", **options)
        qemu_io(path, *writes, fmt="vhdx")
        images[name] = (path, block)
    pattern = d / "pattern.raw"
    pattern.write_bytes(random_bytes(21, 2 * MIB) + bytes(3 * MIB) + random_bytes(22, MIB))
    converted = d / "converted.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1M",
             pattern, converted)
    images["converted"] = (converted, MIB)
    return images


VARIANTS = ["dynamic", "block-1m-log-1m", "block-32m", "no-zero-state", "fixed",
            "fixed-present", "converted"]


def _copy(templates: dict[str, tuple[Path, int]], variant: str,
          tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / f"{variant}.vhdx"
    shutil.copyfile(templates[variant][0], path)
    return path, reference_raw(path, tmp_path / f"{variant}.raw", "vhdx")


async def _open_rw(path: Path) -> VhdxNode:
    node = await open_image(str(path), OpenOptions(read_only=False, format="vhdx"))
    assert isinstance(node, VhdxNode)
    return node



def _headers(path: Path) -> list[VhdxHeader]:
    data = path.read_bytes()
    return [VhdxHeader.parse(data[offset : offset + 4096]) for offset in HEADER_OFFSETS]


def _active_header(path: Path) -> VhdxHeader:
    return max(_headers(path), key=lambda header: header.sequence_number)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_workload_matches_qemu(vhdx_templates: dict[str, tuple[Path, int]],
                                     variant: str, tmp_path: Path) -> None:
    path, reference = _copy(vhdx_templates, variant, tmp_path)
    size = path.stat().st_size
    ops = make_block_workload(reference.stat().st_size, seed=len(variant),
                              unit=vhdx_templates[variant][1])
    node = await run_workload_checked(path, "vhdx", ops, reference)
    counters = node.counters
    if variant in ("dynamic", "block-32m", "fixed-present"):
        # Every block was present already (the pre-fill touched both 8 MiB blocks).
        assert counters.blocks_allocated == counters.log_entries_written == 0
    else:
        assert counters.blocks_allocated > 0
        assert counters.log_entries_written > 0
    if variant == "fixed-present":
        assert path.stat().st_size == size
    # The other header may still name the last log entry: replaying it again is harmless.
    assert _active_header(path).log_guid == NIL_GUID


@pytest.mark.parametrize("variant", VARIANTS)
async def test_conformance_writable(vhdx_templates: dict[str, tuple[Path, int]], variant: str,
                                    tmp_path: Path) -> None:
    path, reference = _copy(vhdx_templates, variant, tmp_path)
    await check_block_node(lambda: _open_rw(path), reference.read_bytes(), writable=True)
    assert_clean(path, "vhdx")


# -- a pending log --


def _qemu_needs_replay(path: Path) -> bool:
    proc = run(QEMU_IMG, "check", "-f", "vhdx", path, check=False)
    return proc.returncode == 1 and "needs to be replayed" in proc.stderr


async def test_writable_open_replays_log_into_file(tmp_path: Path) -> None:
    path, expected = vb.dirty_log_image(tmp_path)
    assert _qemu_needs_replay(path)
    node = await _open_rw(path)
    try:
        assert node.counters.log_entries_replayed == 2
        assert any("entries into the file" in w for w in node.warnings)
        assert node.child("file").driver == "file"
        assert await node.pread(0, node.size) == expected
    finally:
        await node.aclose()
    headers = _headers(path)
    assert all(header.log_guid == NIL_GUID for header in headers)
    assert headers[0].data_write_guid == headers[1].data_write_guid
    assert not _qemu_needs_replay(path)
    assert_clean(path, "vhdx")
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_compare(path, "vhdx", tmp_path / "expected.raw")


async def test_refused_writable_open_writes_nothing(tmp_path: Path) -> None:
    """The pending log is replayed only once the open is known to succeed: here the metadata
    turns out to be broken (a differencing flag without a parent locator)."""
    path, _ = vb.dirty_log_image(tmp_path)
    layout = vb.read_layout(path)
    vb.set_metadata_item(path, layout, vb.FILE_PARAMETERS, struct.pack("<II", MIB, 0x2))
    digest = sha256_file(path)
    with pytest.raises(FormatError, match="without a parent locator"):
        await _open_rw(path)
    assert sha256_file(path) == digest


@pytest.mark.parametrize("variant", [*VARIANTS, "pending-log"])
async def test_read_only_open_changes_nothing(vhdx_templates: dict[str, tuple[Path, int]],
                                              variant: str, tmp_path: Path) -> None:
    if variant == "pending-log":
        path, _ = vb.dirty_log_image(tmp_path)
    else:
        path, _ = _copy(vhdx_templates, variant, tmp_path)
    await assert_use_changes_nothing(path)


async def test_writable_open_without_writes_changes_nothing(
        vhdx_templates: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    path, _ = _copy(vhdx_templates, "block-1m-log-1m", tmp_path)

    async def zero_unwritten(node: BlockNode) -> None:
        await node.zero(5 * MIB, MIB)  # never written: reads as zeros already, nothing to do

    await assert_use_changes_nothing(path, writable=True, fmt="vhdx", also=zero_unwritten)


# -- headers --


async def test_first_write_renews_guids_in_both_headers(
        vhdx_templates: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    path, _ = _copy(vhdx_templates, "block-1m-log-1m", tmp_path)
    before = _headers(path)
    node = await _open_rw(path)
    try:
        await node.pwrite(64 * 1024, b"in place")
        during = _headers(path)
        await node.pwrite(7 * MIB, b"allocates")
        await node.pwrite(8 * MIB, b"allocates")
    finally:
        await node.aclose()
    after = _headers(path)
    old_top = max(h.sequence_number for h in before)
    assert sorted(h.sequence_number for h in during) == [old_top + 1, old_top + 2]
    for header in during:
        assert header.file_write_guid not in {h.file_write_guid for h in before}
        assert header.data_write_guid not in {h.data_write_guid for h in before}
        assert header.log_guid == NIL_GUID
    assert during[0].data_write_guid == during[1].data_write_guid
    # One write-back of two BAT entries (one sector): a header naming the log, one clearing it.
    assert max(h.sequence_number for h in after) == old_top + 4
    assert {h.data_write_guid for h in after} == {during[0].data_write_guid}


async def test_parent_written_invalidates_child(vhdx_templates: dict[str, tuple[Path, int]],
                                                tmp_path: Path) -> None:
    """A differencing child records its parent's DataWriteGuid: once vdiskfs writes the
    parent, the child refuses it, as Hyper-V would."""
    parent, _ = _copy(vhdx_templates, "dynamic", tmp_path)
    spec = vb.DiffSpec(virtual_size=SIZE, states={0: vb.FULLY_PRESENT},
                       blocks={0: random_bytes(5, MIB)}, locator={
                           "parent_linkage": "{" + str(vb.read_layout(parent).data_write_guid)
                           + "}", "relative_path": parent.name})
    child = tmp_path / "child.vhdx"
    vb.build_differencing(child, spec)
    node = await open_image(str(child))
    await node.aclose()
    with pytest.raises(UnsupportedError, match="differencing"):
        await _open_rw(child)
    writer = await _open_rw(parent)
    await writer.pwrite(0, b"changed")
    await writer.aclose()
    with pytest.raises(FormatError, match="DataWriteGuid"):
        await open_image(str(child))


# -- the log vdiskfs writes --


async def test_log_written_is_replayed_by_qemu(vhdx_templates: dict[str, tuple[Path, int]],
                                               tmp_path: Path) -> None:
    """Power cut right after the log entry and the header naming it: the BAT update lives only
    in the log. QEMU's replay and vdiskfs's (in memory) both find the new block."""
    path, reference = _copy(vhdx_templates, "block-1m-log-1m", tmp_path)
    # Session headers (2), the new block (extend, data), then log entry and its header (2).
    node, cut = await open_faulty(path, VhdxNode, mode=CrashMode.DROP)
    cut.crash_in(6)
    try:
        await node.pwrite(9 * MIB + 100, b"\x5e" * 5000)
        await node.flush()
        assert cut.dropped > 0 and node.counters.log_entries_written == 1
    finally:
        await node.aclose()
    write_reference(reference, 9 * MIB + 100, b"\x5e" * 5000)
    assert _qemu_needs_replay(path)
    reopened = await open_image(str(path))
    try:
        assert reopened.counters.log_entries_replayed == 1
        await assert_reads_match(reopened, reference)
    finally:
        await reopened.aclose()
    repaired = qemu_repaired_copy(path, "vhdx")
    assert_qemu_agrees(repaired, "vhdx", reference)
    # A writable open replays it into the file as QEMU did.
    node = await _open_rw(path)
    await node.aclose()
    assert_qemu_agrees(path, "vhdx", reference)


async def test_write_back_in_several_log_entries(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """More changed BAT sectors than one log entry holds: several entries, each replayed and
    cleared in turn; too many dirty sectors force a write-back before any flush. (A BAT sector
    maps 512 blocks: the disk is large, and sparse; QEMU reads back only what was written.)"""
    monkeypatch.setattr(vhdx_driver, "MAX_LOG_ENTRY", 3 * 4096)  # two data sectors an entry
    path = create(tmp_path / "big.vhdx", 2560 * MIB, "vhdx", block_size="1M")
    written: list[tuple[int, int, int]] = []

    async def write(node: VhdxNode, sector: int, length: int) -> None:
        offset = sector * 512 * MIB + 77 * sector
        await node.pwrite(offset, bytes([0x40 + sector]) * length)
        written.append((offset, length, 0x40 + sector))

    node = await _open_rw(path)
    try:
        for sector in (1, 2, 3):
            await write(node, sector, 1000)
        await node.flush()
        assert node.counters.log_entries_written == 2  # three sectors, two an entry
        assert node.counters.bat_sectors_written == 3
        monkeypatch.setattr(vhdx_driver, "BAT_DIRTY_LIMIT", 2)
        await write(node, 0, 10)
        assert node.counters.bat_sectors_written == 3
        await write(node, 4, 10)
        assert node.counters.bat_sectors_written == 5  # written back without a flush
    finally:
        await node.aclose()
    assert node.counters.log_entries_written == 3
    assert_clean(path, "vhdx")
    for offset, length, fill in written:
        qemu_io(path, f"read -P {fill:#x} {offset} {length}",
                f"read -P 0 {offset + length} 4096", fmt="vhdx")


# -- zeroes and concurrency --


async def test_zero_never_allocates(vhdx_templates: dict[str, tuple[Path, int]],
                                    tmp_path: Path) -> None:
    path, reference = _copy(vhdx_templates, "block-1m-log-1m", tmp_path)
    size = path.stat().st_size
    node = await _open_rw(path)
    try:
        await node.zero(2 * MIB + 100, 3 * MIB)  # present block 3, never-written 2 and 4
        assert node.counters.blocks_allocated == 0
    finally:
        await node.aclose()
    assert path.stat().st_size == size
    write_reference(reference, 2 * MIB + 100, bytes(3 * MIB))
    assert_qemu_agrees(path, "vhdx", reference)


async def test_concurrent_writes_to_one_new_block(vhdx_templates: dict[str, tuple[Path, int]],
                                                  tmp_path: Path) -> None:
    path, reference = _copy(vhdx_templates, "block-1m-log-1m", tmp_path)
    pieces = [(6 * MIB + i * 20_000, bytes([i + 1]) * 9000) for i in range(20)]
    node = await write_racing(path, "vhdx", pieces, reference)
    assert node.counters.blocks_allocated == 1


# -- crashes --


async def _crash(templates: dict[str, tuple[Path, int]], variant: str, budget: int,
                 tmp_path: Path) -> None:
    path, _ = _copy(templates, variant, tmp_path)
    got, _ = await run_crash(path, VhdxNode, budget=budget, seed=budget,
                             unit=templates[variant][1])
    if _qemu_needs_replay(path):
        # The crash hit between the header naming a log entry and the one clearing it: the
        # BAT update is in the log. QEMU's replay reads what vdiskfs's replay read.
        path = qemu_repaired_copy(path, "vhdx")
    assert_clean(path, "vhdx")  # leaked blocks are invisible to QEMU's vhdx check
    assert_same_as_model(path, "vhdx", got, tmp_path / "ours.raw")


# Budgets 9, 16, 21, 29, 37 and 59 cut the power while the log holds the BAT update.
@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 9, 16, 21, 29, 37, 50, 59])
@pytest.mark.parametrize("variant", ["block-1m-log-1m", "fixed-present"])
async def test_crash_keeps_flushed_data(vhdx_templates: dict[str, tuple[Path, int]],
                                        variant: str, budget: int, tmp_path: Path) -> None:
    await _crash(vhdx_templates, variant, budget, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("budget", range(0, 70))
async def test_crash_after_every_write(vhdx_templates: dict[str, tuple[Path, int]],
                                       budget: int, tmp_path: Path) -> None:
    await _crash(vhdx_templates, "block-1m-log-1m", budget, tmp_path)


def test_log_entry_round_trip() -> None:
    """What encode_entry writes, the reader's search finds and replays."""
    from vdiskfs.drivers.format.vhdx.log import (
        ReplayOverlay,
        encode_entry,
        find_active_sequence,
        max_data_sectors,
    )

    guid = uuid.uuid4()
    sectors = [(4 * MIB, random_bytes(1, 4096)), (4 * MIB + 8192, random_bytes(2, 4096))]
    log = bytearray(MIB)
    entry = encode_entry(sectors, sequence=(7 << 32) + 3, tail=0, log_guid=guid,
                         flushed_file_offset=8 * MIB, last_file_offset=8 * MIB)
    log[: len(entry)] = entry
    entries = find_active_sequence(bytes(log), guid)
    assert [e.sequence for e in entries] == [(7 << 32) + 3]
    assert find_active_sequence(bytes(log), uuid.uuid4()) == []
    overlay = ReplayOverlay.replay(entries, file_size=8 * MIB, log_range=(MIB, MIB),
                                   label="x")
    buf = bytearray(12288)
    overlay.apply(4 * MIB, buf)
    assert bytes(buf[:4096]) == sectors[0][1] and bytes(buf[8192:]) == sectors[1][1]
    assert max_data_sectors(MIB) == 254
    assert max_data_sectors(3 * 4096) == 2
