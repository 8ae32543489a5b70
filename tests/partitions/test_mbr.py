"""MBR tables: disks written by sfdisk/fdisk checked against their own listing, then the rules
of Linux's msdos.c on hand-built bytes."""

from __future__ import annotations

import pytest

from tests.support.partitioned import (
    GptEntry,
    PartitionedDisk,
    boot_record,
    build_gpt,
    layout,
    mbr_entry,
    put,
    read_window,
    reference_partitions,
    scan_bytes,
    scan_image,
)
from vdiskfs.partitions.mbr import decode_boot_record

MiB = 1 << 20
DISK = 8 * MiB


def mbr_disk_bytes(*entries: bytes | None, size: int = DISK, disk_signature: int = 0) -> bytearray:
    return put(bytearray(size), 0, boot_record(*entries, disk_signature=disk_signature))


# -- disks written by the reference tools --------------------------------------------------------


async def test_sfdisk_disk_matches_sfdisk_json(mbr_disk: PartitionedDisk) -> None:
    table = await scan_image(mbr_disk.path)
    assert table.scheme == "mbr"
    assert table.sector_size == 512
    assert table.disk_signature == "0x1234abcd"
    assert table.warnings == ()
    reference = {p.number: p for p in reference_partitions(mbr_disk.path)}
    assert [p.number for p in table.partitions] == sorted(reference) == [1, 2, 3, 5, 6]
    for part in table.partitions:
        ref = reference[part.number]
        assert (part.start, part.declared_size, part.type, part.bootable) == (
            ref.start, ref.size, ref.type, ref.bootable), part
        assert part.scheme == "mbr"
        if part.extended:
            # Linux's /dev/sda3 of an extended partition: 1 KiB over its first EBR.
            assert part.number == 3 and part.size == 1024 and part.type_name == "Extended"
        else:
            assert part.size == ref.size
        assert part.logical == (part.number >= 5)
    assert table.by_number(1).type_name == "W95 FAT32 (LBA)"  # type: ignore[union-attr]
    assert table.by_number(6).type_name == "Linux swap / Solaris"  # type: ignore[union-attr]
    assert table.by_number(4) is None


async def test_sfdisk_disk_file_systems_sit_where_the_windows_say(
        mbr_disk: PartitionedDisk) -> None:
    table = await scan_image(mbr_disk.path)
    boot = await read_window(mbr_disk.path, table.by_number(1), 0, 512)  # type: ignore[arg-type]
    assert boot[510:512] == b"\x55\xaa" and b"BOOT" in boot
    superblock = await read_window(mbr_disk.path, table.by_number(5), 1024, 1024)  # type: ignore[arg-type]
    assert superblock[56:58] == b"\x53\xef"  # ext4 magic
    assert superblock[120:124] == b"data"  # volume label


async def test_fdisk_4k_mbr_needs_its_sector_size(mbr_4k_disk: PartitionedDisk) -> None:
    table = await scan_image(mbr_4k_disk.path, sector_size=4096)
    assert table.scheme == "mbr" and table.sector_size == 4096
    assert table.warnings == ()
    reference = {p.number: p for p in reference_partitions(mbr_4k_disk.path, 4096)}
    assert [p.number for p in table.partitions] == sorted(reference) == [1, 2, 5]
    for part in table.partitions:
        ref = reference[part.number]
        assert (part.start, part.declared_size, part.type) == (ref.start, ref.size, ref.type)
    # On 4096-byte sectors Linux exposes one logical sector of the extended partition.
    assert table.by_number(2).size == 4096  # type: ignore[union-attr]
    # Read with the default 512, the same table is wrong, and the chain walk says so.
    wrong = await scan_image(mbr_4k_disk.path)
    assert wrong.by_number(1).start == 256 * 512  # type: ignore[union-attr]
    assert any("no 0x55AA signature in the EBR" in w for w in wrong.warnings)


# -- the boot record -----------------------------------------------------------------------------


def test_decode_boot_record() -> None:
    sector = boot_record(None, mbr_entry(0x83, 2048, 100, boot=0x80), disk_signature=0xDEADBEEF)
    record = decode_boot_record(sector)
    assert record is not None
    assert record.disk_signature == 0xDEADBEEF
    assert [e.used for e in record.entries] == [False, True, False, False]
    second = record.entries[1]
    assert (second.slot, second.boot_indicator, second.type, second.start_lba,
            second.sectors) == (2, 0x80, 0x83, 2048, 100)
    assert decode_boot_record(sector[:511]) is None
    assert decode_boot_record(boot_record(signature=b"\x55\xab")) is None


async def test_no_table() -> None:
    assert (await scan_bytes(bytes(DISK))).scheme is None
    assert (await scan_bytes(b"\x55\xaa" * 100)).scheme is None  # smaller than a sector
    assert (await scan_bytes(b"")).partitions == ()
    # A signature and four empty slots: an MBR with no partitions.
    empty = await scan_bytes(mbr_disk_bytes())
    assert (empty.scheme, empty.partitions, empty.warnings) == ("mbr", (), ())


async def test_primaries_are_numbered_by_slot() -> None:
    table = await scan_bytes(mbr_disk_bytes(None, None, mbr_entry(0x83, 2048, 4096, boot=0x80),
                                            mbr_entry(0x07, 8192, 2048)))
    assert layout(table) == [(3, 2048, 4096), (4, 8192, 2048)]
    third = table.partitions[0]
    assert (third.type, third.type_name, third.bootable) == ("0x83", "Linux", True)
    assert table.partitions[1].type_name == "HPFS/NTFS/exFAT"
    assert table.warnings == ()


async def test_unknown_type_and_empty_type_with_sectors() -> None:
    table = await scan_bytes(mbr_disk_bytes(mbr_entry(0x00, 2048, 100), mbr_entry(0x99, 4096, 8),
                                            mbr_entry(0x83, 8192, 0)))
    # Linux tests the sector count only: a type-0 entry with sectors is a partition.
    assert layout(table) == [(1, 2048, 100), (2, 4096, 8)]
    assert table.partitions[0].type_name == "Empty"
    assert table.partitions[1].type_name == "unknown"
    assert any("slot 1: type 0x00" in w for w in table.warnings)
    assert any("slot 3: type 0x83 with 0 sectors: skipped" in w for w in table.warnings)


def ebr(data: bytes | None = None, link: bytes | None = None, *rest: bytes | None) -> bytes:
    return boot_record(data, link, *rest)


@pytest.mark.parametrize("ext_type", [0x05, 0x0F, 0x85])
async def test_logical_partitions_follow_the_chain(ext_type: int) -> None:
    # Extended partition in slot 2 at sector 4096; EBRs at 4096, 8192 and 6144 (chain order is
    # not disk order); data entries relative to their EBR, links relative to the extended start.
    disk = mbr_disk_bytes(mbr_entry(0x83, 2048, 2048),
                          mbr_entry(ext_type, 4096, 8192),
                          mbr_entry(0x83, 12288, 1024))
    put(disk, 4096 * 512, ebr(mbr_entry(0x83, 64, 1000), mbr_entry(0x05, 4096, 2048)))
    put(disk, 8192 * 512, ebr(mbr_entry(0x82, 100, 500), mbr_entry(0x05, 2048, 2048)))
    put(disk, 6144 * 512, ebr(mbr_entry(0x07, 1, 1500)))
    table = await scan_bytes(disk)
    assert layout(table) == [
        (1, 2048, 2048),
        (2, 4096, 2),  # 1 KiB
        (3, 12288, 1024),
        (5, 4160, 1000),
        (6, 8292, 500),
        (7, 6145, 1500),
    ]
    extended = table.by_number(2)
    assert extended is not None and extended.extended and extended.declared_size == 8192 * 512
    assert [p.logical for p in table.partitions] == [False, False, False, True, True, True]
    assert table.warnings == ()


async def test_extended_window_is_cut_to_a_tiny_extended_partition() -> None:
    table = await scan_bytes(mbr_disk_bytes(mbr_entry(0x05, 4096, 1)))
    assert layout(table) == [(1, 4096, 1)]


async def test_two_extended_partitions_continue_the_numbering() -> None:
    disk = mbr_disk_bytes(mbr_entry(0x05, 2048, 2048), mbr_entry(0x0F, 4096, 2048))
    put(disk, 2048 * 512, ebr(mbr_entry(0x83, 1, 100), mbr_entry(0x05, 200, 300)))
    put(disk, 2248 * 512, ebr(mbr_entry(0x83, 1, 100)))
    put(disk, 4096 * 512, ebr(mbr_entry(0x83, 1, 100)))
    table = await scan_bytes(disk)
    assert [p.number for p in table.partitions] == [1, 2, 5, 6, 7]
    assert table.by_number(7).start == 4097 * 512  # type: ignore[union-attr]


async def test_ebr_with_several_data_entries() -> None:
    # OS/2 uses all four slots; DR-DOS puts the link first. Slots 3-4 must fit the EBR's extent.
    disk = mbr_disk_bytes(mbr_entry(0x05, 2048, 4096))
    put(disk, 2048 * 512, ebr(mbr_entry(0x05, 1024, 1024), mbr_entry(0x83, 1, 100),
                              mbr_entry(0x83, 200, 100), mbr_entry(0x83, 400, 100)))
    put(disk, 3072 * 512, ebr(mbr_entry(0x83, 1, 100)))
    table = await scan_bytes(disk)
    assert layout(table) == [(1, 2048, 2), (5, 2049, 100), (6, 2248, 100), (7, 2448, 100),
                             (8, 3073, 100)]
    assert table.warnings == ()


async def test_whole_disk_fat_is_not_a_table() -> None:
    # A FAT boot sector has 0x55AA too; its "slot 1" boot indicator is code, not 0 or 0x80.
    sector = bytearray(boot_record(mbr_entry(0x83, 2048, 100)))
    sector[446] = 0x12  # slot 1 boot indicator
    sector[14:16] = (32).to_bytes(2, "little")  # reserved sectors
    sector[16] = 2  # FATs
    sector[21] = 0xF8  # media
    table = await scan_bytes(put(bytearray(DISK), 0, bytes(sector)))
    assert (table.scheme, table.partitions, table.warnings) == (None, (), ())
    # The same boot indicator without the FAT fields: no table either, but say why.
    sector[21] = 0x00
    table = await scan_bytes(put(bytearray(DISK), 0, bytes(sector)))
    assert table.scheme is None
    assert any("slot 1 has boot indicator 0x12" in w for w in table.warnings)


async def test_stale_gpt_header_does_not_beat_an_mbr() -> None:
    # A disk once GPT, re-labelled MBR by a tool that left LBA 1 alone: Linux reads the MBR.
    disk = build_gpt(DISK, [GptEntry(0, 2048, 4095)],
                     mbr=boot_record(mbr_entry(0x83, 4096, 2048)))
    table = await scan_bytes(disk)
    assert table.scheme == "mbr"
    assert layout(table) == [(1, 4096, 2048)]
    assert any("GPT header at LBA 1" in w and "MBR is used" in w for w in table.warnings)


async def test_label_names_the_disk_in_warnings() -> None:
    table = await scan_bytes(mbr_disk_bytes(mbr_entry(0x83, 8192, 0)), label="vm.qcow2")
    assert table.warnings and all(w.startswith("vm.qcow2: ") for w in table.warnings)


async def test_refuses_an_unknown_sector_size() -> None:
    with pytest.raises(ValueError, match="sector size 520"):
        await scan_bytes(mbr_disk_bytes(), sector_size=520)
