"""GPT: disks written by sfdisk, sgdisk and fdisk checked against their own listings, then
header checks, backup use, 4096-byte sectors and entry decoding on hand-built bytes."""

from __future__ import annotations

import struct
import zlib

import pytest

from tests.support.partitioned import (
    BIOS_BOOT_GUID,
    DISK_GUID,
    EFI_SYSTEM_GUID,
    LINUX_FS_GUID,
    GptEntry,
    PartitionedDisk,
    boot_record,
    build_gpt,
    gpt_header,
    layout,
    mbr_entry,
    protective_mbr,
    put,
    read_window,
    reference_partitions,
    scan_bytes,
    scan_image,
    sgdisk_info,
)
from vdiskfs.partitions.gpt import decode_header, header_problem

MiB = 1 << 20
DISK = 4 * MiB
SECTORS = DISK // 512
LAST_LBA = SECTORS - 1


def three_entries() -> list[GptEntry]:
    return [
        GptEntry(0, 2048, 4095, EFI_SYSTEM_GUID, name="EFI System"),
        GptEntry(1, 4096, 6143, name="root", attributes=1 << 2),
        GptEntry(3, 6144, 8000, BIOS_BOOT_GUID),
    ]


def corrupt(disk: bytearray, offset: int) -> bytearray:
    disk[offset] ^= 0xFF
    return disk


# -- disks written by the reference tools --------------------------------------------------------


async def check_against_reference(disk: PartitionedDisk) -> None:
    table = await scan_image(disk.path)
    assert table.scheme == "gpt"
    assert table.sector_size == disk.sector_size
    assert table.disk_guid == DISK_GUID
    assert table.warnings == ()
    reference = {p.number: p for p in reference_partitions(disk.path, disk.sector_size)}
    assert [p.number for p in table.partitions] == sorted(reference)
    for part in table.partitions:
        ref = reference[part.number]
        assert (part.start, part.size, part.type, part.name, part.guid) == (
            ref.start, ref.size, ref.type, ref.name, ref.uuid), part
        assert part.scheme == "gpt" and not part.extended and not part.logical


async def test_sfdisk_gpt_matches_sfdisk_json(gpt_disk: PartitionedDisk) -> None:
    await check_against_reference(gpt_disk)
    table = await scan_image(gpt_disk.path)
    assert [p.type_name for p in table.partitions] == [
        "Linux filesystem", "EFI System", "Linux filesystem"]
    esp = table.by_number(2)
    assert esp is not None and esp.bootable and esp.attributes == 1 << 2


async def test_sfdisk_gpt_matches_sgdisk_info(gpt_disk: PartitionedDisk) -> None:
    table = await scan_image(gpt_disk.path)
    for part in table.partitions:
        info = sgdisk_info(gpt_disk.path, part.number)
        assert info["Partition GUID code"].split()[0].lower() == part.type
        assert info["Partition unique GUID"].lower() == part.guid
        assert int(info["First sector"].split()[0]) * 512 == part.start
        assert int(info["Last sector"].split()[0]) * 512 == part.end - 512
        assert int(info["Attribute flags"], 16) == part.attributes
        assert info["Partition name"] == repr(part.name)


async def test_sfdisk_gpt_file_systems_sit_where_the_windows_say(
        gpt_disk: PartitionedDisk) -> None:
    table = await scan_image(gpt_disk.path)
    superblock = await read_window(gpt_disk.path, table.by_number(1), 1024, 1024)  # type: ignore[arg-type]
    assert superblock[56:58] == b"\x53\xef" and superblock[120:124] == b"root"
    boot = await read_window(gpt_disk.path, table.by_number(2), 0, 512)  # type: ignore[arg-type]
    assert boot[510:512] == b"\x55\xaa" and b"ESP" in boot
    assert await read_window(gpt_disk.path, table.by_number(3), 0, 4096) == bytes(4096)  # type: ignore[arg-type]


async def test_sgdisk_gpt_with_a_gap(sgdisk_disk: PartitionedDisk) -> None:
    await check_against_reference(sgdisk_disk)
    table = await scan_image(sgdisk_disk.path)
    assert [p.number for p in table.partitions] == [1, 3, 4]
    assert [p.type_name for p in table.partitions] == ["BIOS boot", "Linux filesystem",
                                                       "Linux swap"]
    assert [p.bootable for p in table.partitions] == [False, True, False]
    for part in table.partitions:
        info = sgdisk_info(sgdisk_disk.path, part.number)
        assert info["Partition unique GUID"].lower() == part.guid
        assert int(info["Attribute flags"], 16) == part.attributes
        assert info["Partition name"] == repr(part.name)


async def test_fdisk_4k_gpt_is_found_at_byte_4096(gpt_4k_disk: PartitionedDisk) -> None:
    await check_against_reference(gpt_4k_disk)
    forced = await scan_image(gpt_4k_disk.path, sector_size=4096)
    assert forced.partitions == (await scan_image(gpt_4k_disk.path)).partitions
    superblock = await read_window(gpt_4k_disk.path, forced.by_number(1), 1024, 1024)  # type: ignore[arg-type]
    assert superblock[56:58] == b"\x53\xef" and superblock[120:122] == b"4k"
    # Forced to 512, the protective MBR points at a GPT that is not there.
    wrong = await scan_image(gpt_4k_disk.path, sector_size=512)
    assert (wrong.scheme, wrong.partitions) == ("gpt", ())
    assert any("no valid header" in w for w in wrong.warnings)


# -- hand-built tables ---------------------------------------------------------------------------


async def test_entries_numbered_by_index_with_gaps() -> None:
    table = await scan_bytes(build_gpt(DISK, three_entries()))
    assert table.scheme == "gpt" and table.warnings == ()
    assert layout(table) == [(1, 2048, 2048), (2, 4096, 2048), (4, 6144, 1857)]
    first, second, fourth = table.partitions
    assert (first.type, first.type_name, first.name) == (EFI_SYSTEM_GUID, "EFI System",
                                                         "EFI System")
    assert second.bootable and second.attributes == 4 and not first.bootable
    assert fourth.guid == "00000000-0000-4000-8000-000000000004"
    assert (fourth.name, fourth.type_name) == ("", "BIOS boot")


@pytest.mark.parametrize(("name", "expected"), [
    ("plain", "plain"),
    ("\u00e9t\u00e9 \U0001f600", "\u00e9t\u00e9 \U0001f600"),  # a surrogate pair
    ("x" * 36, "x" * 36),  # all 72 bytes, no terminating NUL
])
async def test_names_are_utf16le(name: str, expected: str) -> None:
    table = await scan_bytes(build_gpt(DISK, [GptEntry(0, 2048, 4095, name=name)]))
    assert table.partitions[0].name == expected


async def test_a_lone_surrogate_in_a_name_is_replaced() -> None:
    entry = bytearray(GptEntry(0, 2048, 4095).pack())
    entry[56:60] = b"\x00\xd8A\x00"  # U+D800 then "A"
    disk = build_gpt(DISK, [])
    array = bytearray(128 * 128)
    array[:128] = entry
    # Rewrite the primary array and header CRC by building the header again.
    put(disk, 1024, bytes(array))
    put(disk, 512, gpt_header(my_lba=1, alternate_lba=LAST_LBA, first_usable_lba=34,
                              last_usable_lba=LAST_LBA - 33, entries_lba=2, entry_count=128,
                              entries_crc32=zlib.crc32(bytes(array))))
    table = await scan_bytes(disk)
    assert table.partitions[0].name == "\ufffdA"


async def test_larger_entry_size_is_accepted() -> None:
    # UEFI allows 128 * 2**n bytes per entry; only the first 128 bytes are defined.
    disk = build_gpt(DISK, three_entries(), entry_size=256, entry_count=64)
    table = await scan_bytes(disk)
    assert layout(table) == [(1, 2048, 2048), (2, 4096, 2048), (4, 6144, 1857)]
    assert table.warnings == ()


async def test_hybrid_mbr_defers_to_gpt() -> None:
    hybrid = protective_mbr(SECTORS, mbr_entry(0x0C, 2048, 2048, boot=0x80),
                            mbr_entry(0x83, 100, 50))
    table = await scan_bytes(build_gpt(DISK, three_entries(), mbr=hybrid))
    assert table.scheme == "gpt"
    assert layout(table) == [(1, 2048, 2048), (2, 4096, 2048), (4, 6144, 1857)]
    assert any("hybrid MBR: entries in slots 2, 3 ignored" in w for w in table.warnings)


async def test_protective_entry_in_another_slot_or_not_at_lba_1() -> None:
    mbr = boot_record(None, None, mbr_entry(0xEE, 5, SECTORS - 5))
    table = await scan_bytes(build_gpt(DISK, three_entries(), mbr=mbr))
    assert len(table.partitions) == 3
    assert any("starts at LBA 5, not 1" in w for w in table.warnings)


async def test_gpt_without_protective_mbr_is_used_with_a_warning() -> None:
    disk = build_gpt(DISK, three_entries())
    put(disk, 0, bytes(512))
    table = await scan_bytes(disk)
    assert table.scheme == "gpt" and len(table.partitions) == 3
    assert any("without a protective MBR" in w for w in table.warnings)


@pytest.mark.parametrize(("where", "reason"), [
    (512 + 40, "header CRC32 mismatch"),  # first usable LBA
    (1024 + 32, "entry array CRC32 mismatch"),  # first entry's first LBA
    (512, "no GPT signature"),
])
async def test_damaged_primary_falls_back_to_the_backup(where: int, reason: str) -> None:
    table = await scan_bytes(corrupt(build_gpt(DISK, three_entries()), where))
    assert any("primary header at LBA 1 is invalid" in w and reason in w
               and f"using the backup at LBA {LAST_LBA}" in w for w in table.warnings)
    assert layout(table) == [(1, 2048, 2048), (2, 4096, 2048), (4, 6144, 1857)]


async def test_bytes_past_header_size_are_not_checked() -> None:
    table = await scan_bytes(corrupt(build_gpt(DISK, three_entries()), 512 + 100))
    assert table.warnings == () and len(table.partitions) == 3


async def test_damaged_backup_is_reported_primary_used() -> None:
    disk = corrupt(build_gpt(DISK, three_entries()), LAST_LBA * 512 + 30)
    table = await scan_bytes(disk)
    assert len(table.partitions) == 3
    assert any(f"backup header at LBA {LAST_LBA} is invalid (header CRC32 mismatch)" in w
               for w in table.warnings)


async def test_resized_disk_backup_not_at_the_end() -> None:
    disk = build_gpt(DISK, three_entries()) + bytearray(MiB)
    table = await scan_bytes(disk)
    assert len(table.partitions) == 3
    assert any("not at the end of the disk" in w for w in table.warnings)


async def test_backup_found_through_an_intact_primary_header() -> None:
    # Primary array damaged, disk grown: the backup is where the primary header says, not at
    # the (new) last LBA.
    disk = corrupt(build_gpt(DISK, three_entries()), 1024 + 40) + bytearray(MiB)
    table = await scan_bytes(disk)
    assert len(table.partitions) == 3
    assert any(f"using the backup at LBA {LAST_LBA}" in w for w in table.warnings)


async def test_both_headers_damaged() -> None:
    disk = corrupt(corrupt(build_gpt(DISK, three_entries()), 512 + 24), LAST_LBA * 512 + 24)
    table = await scan_bytes(disk)
    assert (table.scheme, table.partitions) == ("gpt", ())
    warning = next(w for w in table.warnings if "no valid header" in w)
    assert "primary at LBA 1: header CRC32 mismatch" in warning
    assert f"backup at LBA {LAST_LBA}: header CRC32 mismatch" in warning


async def test_4k_gpt_by_hand_and_its_backup() -> None:
    disk = build_gpt(DISK, [GptEntry(0, 256, 511)], sector_size=4096)
    table = await scan_bytes(disk)
    assert (table.sector_size, table.partitions[0].start, table.partitions[0].size) == (
        4096, 256 * 4096, 256 * 4096)
    put(disk, 4096, bytes(4096))  # wipe the primary header: found by its backup
    table = await scan_bytes(disk)
    assert table.sector_size == 4096 and len(table.partitions) == 1
    assert any("using the backup at LBA 1023" in w for w in table.warnings)


def header_fields(**changes: int) -> bytes:
    fields = dict(my_lba=1, alternate_lba=LAST_LBA, first_usable_lba=34,
                  last_usable_lba=LAST_LBA - 33, entries_lba=2, entry_count=128,
                  entries_crc32=0)
    fields.update(changes)
    return gpt_header(**fields)


@pytest.mark.parametrize(("changes", "problem"), [
    ({}, None),
    ({"header_size": 91}, "header size 91 outside 92-512"),
    ({"header_size": 513}, "header size 513 outside 92-512"),
    ({"header_crc32": 1}, "header CRC32 mismatch"),
    ({"my_lba": 2}, "header says it is at LBA 2, found at LBA 1"),
    ({"last_usable_lba": LAST_LBA + 1}, "beyond the disk's last LBA"),
    ({"first_usable_lba": 100, "last_usable_lba": 99}, "last usable LBA 99 before first"),
    ({"entry_size": 0}, "entry size 0 is not 128 * 2**n"),
    ({"entry_size": 192}, "entry size 192 is not 128 * 2**n"),
    ({"entry_size": 1 << 31}, "exceeds the 4 MiB limit"),
    ({"entry_count": 0xFFFFFFFF}, "exceeds the 4 MiB limit"),
    ({"entries_lba": LAST_LBA - 1}, "entry array at LBA 8190 (32 sectors) lies outside"),
    ({"entries_lba": 0}, "lies outside the disk"),
])
def test_header_problem(changes: dict[str, int], problem: str | None) -> None:
    sector = header_fields(**changes)
    header = decode_header(sector)
    assert header is not None
    found = header_problem(sector, header, lba=1, last_lba=LAST_LBA)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_decode_header_fields() -> None:
    sector = header_fields(entry_count=56, entries_crc32=0xABCD)
    header = decode_header(sector)
    assert header is not None
    assert (header.revision, header.header_size, header.my_lba, header.alternate_lba,
            header.entries_lba, header.entry_count, header.entry_size,
            header.entries_crc32) == (0x10000, 92, 1, LAST_LBA, 2, 56, 128, 0xABCD)
    assert header.disk_guid == DISK_GUID
    assert header.header_crc32 == struct.unpack_from("<I", sector, 16)[0]
    assert decode_header(b"EFI PAR" + bytes(505)) is None
    assert decode_header(b"EFI PART") is None


async def test_linux_filesystem_type_guid_spelling() -> None:
    table = await scan_bytes(build_gpt(DISK, [GptEntry(0, 2048, 4095, LINUX_FS_GUID.upper())]))
    assert table.partitions[0].type == LINUX_FS_GUID
