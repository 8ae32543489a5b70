"""Hostile and damaged tables: every bad entry is skipped or cut with a warning, every loop and
size is bounded, and nothing raises. Ends with seeded random tables checked for the invariants
the FUSE layer relies on."""

from __future__ import annotations

import logging
import random

import pytest

from tests.support.partitioned import (
    GptEntry,
    MemoryNode,
    boot_record,
    build_gpt,
    gpt_header,
    layout,
    mbr_entry,
    put,
    scan_bytes,
)
from vdiskfs.block.stats import Op
from vdiskfs.partitions import MAX_PARTITION_NUMBER, PartitionTable, read_partition_table
from vdiskfs.partitions.gpt import MAX_ENTRY_ARRAY_BYTES
from vdiskfs.partitions.model import MAX_WARNINGS

MiB = 1 << 20
DISK = 8 * MiB
SECTORS = DISK // 512
LAST_LBA = SECTORS - 1


def mbr_disk(*entries: bytes | None, size: int = DISK) -> bytearray:
    return put(bytearray(size), 0, boot_record(*entries))


def ebr(*entries: bytes | None) -> bytes:
    return boot_record(*entries)


def warned(table: PartitionTable, *fragments: str) -> bool:
    return any(all(f in w for f in fragments) for w in table.warnings)


async def scan_counting(data: bytes | bytearray) -> tuple[PartitionTable, int]:
    """The table and the number of bytes the scan read."""
    node = MemoryNode(data)
    table = await read_partition_table(node)
    return table, node.stats.bytes[Op.READ]


# -- MBR -----------------------------------------------------------------------------------------


async def test_overlapping_primaries_are_both_exposed() -> None:
    table = await scan_bytes(mbr_disk(mbr_entry(0x83, 2048, 2048), mbr_entry(0x83, 3000, 2000)))
    assert layout(table) == [(1, 2048, 2048), (2, 3000, 2000)]
    assert warned(table, "partitions 1 and 2 overlap", f"bytes {3000 * 512}-{4096 * 512 - 1}")


async def test_start_beyond_the_disk_is_skipped_leaving_a_gap() -> None:
    table = await scan_bytes(mbr_disk(mbr_entry(0x83, 2048, 100),
                                      mbr_entry(0x83, SECTORS + 10, 100),
                                      mbr_entry(0x83, 4096, 100)))
    assert [p.number for p in table.partitions] == [1, 3]
    assert warned(table, "partition 2 starts at byte", "beyond the end of the disk", "skipped")


async def test_entry_running_past_the_end_is_truncated_as_linux_does() -> None:
    table = await scan_bytes(mbr_disk(mbr_entry(0x83, 2048, 0xFFFFFFFF)))
    (part,) = table.partitions
    assert (part.start, part.size, part.declared_size) == (2048 * 512, DISK - 2048 * 512,
                                                           0xFFFFFFFF * 512)
    assert warned(table, "partition 1", "extends beyond the end of the disk", "truncated")


async def test_32_bit_start_plus_size_does_not_wrap() -> None:
    # start + size overflows 32 bits: in 32-bit arithmetic the end would be sector 0x100.
    table = await scan_bytes(mbr_disk(mbr_entry(0x83, 0xFFFFFF00, 0x200)))
    assert table.partitions == ()
    assert warned(table, "partition 1 starts at byte", "skipped")


async def test_logical_beyond_the_disk_keeps_its_number() -> None:
    disk = mbr_disk(mbr_entry(0x05, 2048, 4096))
    put(disk, 2048 * 512, ebr(mbr_entry(0x83, 0xF0000000, 10), mbr_entry(0x05, 100, 100)))
    put(disk, 2148 * 512, ebr(mbr_entry(0x83, 1, 10)))
    table = await scan_bytes(disk)
    assert [p.number for p in table.partitions] == [1, 6]
    assert warned(table, "partition 5 starts at byte")


async def test_ebr_chain_loop_stops_without_duplicates() -> None:
    # The EBR links to itself (link start 0 = the extended partition's first sector).
    disk = mbr_disk(mbr_entry(0x05, 2048, 4096))
    put(disk, 2048 * 512, ebr(mbr_entry(0x83, 1, 10), mbr_entry(0x05, 0, 4096)))
    table, read = await scan_counting(disk)
    assert layout(table) == [(1, 2048, 2), (5, 2049, 10)]
    assert warned(table, "EBR chain loops back to sector 2048")
    assert read <= 4 * 512


async def test_two_ebr_cycle() -> None:
    disk = mbr_disk(mbr_entry(0x05, 2048, 4096))
    put(disk, 2048 * 512, ebr(mbr_entry(0x83, 1, 10), mbr_entry(0x05, 100, 100)))
    put(disk, 2148 * 512, ebr(mbr_entry(0x83, 1, 10), mbr_entry(0x05, 0, 100)))
    table = await scan_bytes(disk)
    assert [p.number for p in table.partitions] == [1, 5, 6]
    assert warned(table, "loops back to sector 2048")


async def test_absurdly_long_chain_stops_at_the_last_linux_number() -> None:
    links = 300
    disk = mbr_disk(mbr_entry(0x05, 2048, 4 * links))
    for k in range(links):
        put(disk, (2048 + 4 * k) * 512,
            ebr(mbr_entry(0x83, 1, 2), mbr_entry(0x05, 4 * (k + 1), 4)))
    table, read = await scan_counting(disk)
    numbers = [p.number for p in table.partitions]
    assert numbers == [1, *range(5, MAX_PARTITION_NUMBER + 1)]
    assert warned(table, "more logical partitions than Linux numbers")
    assert read <= (MAX_PARTITION_NUMBER + 2) * 512


async def test_chain_of_empty_ebrs_is_bounded() -> None:
    links = 150
    disk = mbr_disk(mbr_entry(0x05, 2048, links + 1))
    for k in range(links):
        put(disk, (2048 + k) * 512, ebr(None, mbr_entry(0x05, k + 1, 1)))
    table, read = await scan_counting(disk)
    assert [p.number for p in table.partitions] == [1]
    assert warned(table, "more than 100 EBRs in a row without a partition")
    assert read <= 102 * 512


async def test_link_outside_the_disk_and_link_to_garbage() -> None:
    disk = mbr_disk(mbr_entry(0x05, 2048, 4096), mbr_entry(0x05, 8192, 4096))
    put(disk, 2048 * 512, ebr(mbr_entry(0x83, 1, 10), mbr_entry(0x05, 0xFFFFFFF0, 10)))
    put(disk, 8192 * 512, ebr(mbr_entry(0x83, 1, 10), mbr_entry(0x05, 500, 10)))
    table = await scan_bytes(disk)
    assert [p.number for p in table.partitions] == [1, 2, 5, 6]
    assert warned(table, "EBR at sector", "is outside the disk")
    assert warned(table, "no 0x55AA signature in the EBR at sector 8692")


async def test_garbage_in_ebr_slots_3_and_4_is_skipped() -> None:
    disk = mbr_disk(mbr_entry(0x05, 2048, 1000))
    put(disk, 2048 * 512, ebr(mbr_entry(0x83, 1, 10), None, mbr_entry(0x83, 900, 500),
                              mbr_entry(0x07, 0xDEADBEEF, 0x1000)))
    table = await scan_bytes(disk)
    assert [p.number for p in table.partitions] == [1, 5]
    assert warned(table, "slot 3: entry lies outside its EBR's extent")
    assert warned(table, "slot 4: entry lies outside its EBR's extent")


async def test_logical_outside_its_extended_partition_is_exposed_with_a_warning() -> None:
    disk = mbr_disk(mbr_entry(0x83, 2048, 1000), mbr_entry(0x05, 4096, 1000))
    put(disk, 4096 * 512, ebr(mbr_entry(0x83, 2000, 100)))
    table = await scan_bytes(disk)
    assert [p.number for p in table.partitions] == [1, 2, 5]
    assert warned(table, "logical partition 5", "lies outside extended partition 2")


async def test_logical_overlapping_a_primary() -> None:
    disk = mbr_disk(mbr_entry(0x05, 2048, 4096), mbr_entry(0x83, 2100, 50))
    put(disk, 2048 * 512, ebr(mbr_entry(0x83, 1, 100)))
    table = await scan_bytes(disk)
    assert [p.number for p in table.partitions] == [1, 2, 5]
    assert warned(table, "partitions 2 and 5 overlap")
    # The extended partition's window over its EBR is not an overlap.
    assert not warned(table, "partitions 1 and")


# -- GPT -----------------------------------------------------------------------------------------


def three_entries() -> list[GptEntry]:
    return [GptEntry(0, 2048, 4095), GptEntry(1, 4096, 6143), GptEntry(2, 6144, 8191)]


def replace_primary_header(disk: bytearray, **changes: int) -> bytearray:
    fields = dict(my_lba=1, alternate_lba=LAST_LBA, first_usable_lba=34,
                  last_usable_lba=LAST_LBA - 33, entries_lba=2, entry_count=128,
                  entries_crc32=0)
    fields.update(changes)
    return put(disk, 512, gpt_header(**fields))


async def test_huge_entry_count_is_refused_without_reading_it() -> None:
    disk = replace_primary_header(build_gpt(DISK, three_entries()), entry_count=0xFFFFFFFF)
    table, read = await scan_counting(disk)
    assert len(table.partitions) == 3
    assert warned(table, "primary header at LBA 1 is invalid", "exceeds the 4 MiB limit",
                  "using the backup")
    assert read < 64 * 1024


@pytest.mark.parametrize("changes", [
    {"entry_size": 0x80000000},
    {"entry_size": 0},
    {"entry_size": 129},
    {"entries_lba": 0xFFFFFFFFFFFFFFF0},
    {"header_size": 0xFFFFFFFF},
    {"my_lba": 0xFFFFFFFFFFFFFFFF},
    {"last_usable_lba": 0xFFFFFFFFFFFFFFFF},
])
async def test_hostile_headers_on_both_copies(changes: dict[str, int]) -> None:
    disk = replace_primary_header(build_gpt(DISK, three_entries(), backup=False), **changes)
    table, read = await scan_counting(disk)
    assert (table.scheme, table.partitions) == ("gpt", ())
    assert warned(table, "no valid header")
    assert read < 64 * 1024


async def test_largest_entry_array_is_read_once() -> None:
    count = MAX_ENTRY_ARRAY_BYTES // 128
    disk = build_gpt(12 * MiB, [GptEntry(0, 8192 + 100, 8192 + 200)], entry_count=count)
    table, read = await scan_counting(disk)
    assert len(table.partitions) == 1 and table.warnings == ()
    # The primary's array, then the backup's to check it, and a few sectors.
    assert read <= 2 * MAX_ENTRY_ARRAY_BYTES + 64 * 1024


async def test_bad_entries_are_skipped() -> None:
    entries = [
        GptEntry(0, 2048, 4095),
        GptEntry(1, 5000, 4999),  # last before first
        GptEntry(2, 6000, LAST_LBA + 1),  # past the disk
        GptEntry(3, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
        GptEntry(4, 10, 20),  # before the first usable LBA: kept, as Linux keeps it
    ]
    table = await scan_bytes(build_gpt(DISK, entries))
    assert layout(table) == [(1, 2048, 2048), (5, 10, 11)]
    assert warned(table, "GPT entry 2: last LBA 4999 before first LBA 5000: skipped")
    assert warned(table, "GPT entry 3", "extend past the disk's last LBA")
    assert warned(table, "GPT entry 4", "extend past the disk's last LBA")
    assert warned(table, "GPT entry 5", "outside the usable LBAs", "exposed")


async def test_overlapping_gpt_entries() -> None:
    table = await scan_bytes(build_gpt(DISK, [GptEntry(0, 2048, 8191), GptEntry(5, 4096, 4100)]))
    assert [p.number for p in table.partitions] == [1, 6]
    assert warned(table, "partitions 1 and 6 overlap")


async def test_entries_past_the_linux_limit_are_ignored() -> None:
    entries = [GptEntry(i, 2048 + i, 2048 + i) for i in range(300)]
    table = await scan_bytes(build_gpt(DISK, entries, entry_count=512))
    assert [p.number for p in table.partitions] == list(range(1, MAX_PARTITION_NUMBER + 1))
    assert warned(table, "45 used entries after entry 255 ignored")


async def test_warnings_are_bounded() -> None:
    entries = [GptEntry(i, 2048, 4095) for i in range(MAX_PARTITION_NUMBER)]
    table = await scan_bytes(build_gpt(DISK, entries, entry_count=256))
    assert len(table.partitions) == MAX_PARTITION_NUMBER
    assert len(table.warnings) == MAX_WARNINGS + 1
    assert table.warnings[-1].endswith(
        f"{MAX_PARTITION_NUMBER - 1 - MAX_WARNINGS} more partition table warnings suppressed")


async def test_warnings_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vdiskfs.partitions"):
        table = await scan_bytes(mbr_disk(mbr_entry(0x83, SECTORS, 1)), label="bad.img")
    assert table.warnings
    assert [r.getMessage() for r in caplog.records] == list(table.warnings)
    assert all(r.name == "vdiskfs.partitions" for r in caplog.records)


# -- random tables: the invariants the FUSE layer relies on --------------------------------------


def check_invariants(table: PartitionTable, disk_size: int, read: int) -> None:
    numbers = [p.number for p in table.partitions]
    assert numbers == sorted(set(numbers))
    assert all(1 <= n <= MAX_PARTITION_NUMBER for n in numbers)
    for part in table.partitions:
        assert 0 <= part.start < disk_size and part.size > 0 and part.end <= disk_size, part
        assert part.size <= part.declared_size
    assert len(table.warnings) <= MAX_WARNINGS + 1
    assert read <= 2 * MAX_ENTRY_ARRAY_BYTES + 1024 * 512


def random_mbr_entry(rng: random.Random, near: int) -> bytes | None:
    if rng.random() < 0.2:
        return None
    pick = rng.random()
    type_byte = rng.choice([0x05, 0x0F, 0x85]) if pick < 0.4 else rng.randrange(256)
    if rng.random() < 0.7:
        start, size = rng.randrange(near), rng.randrange(1, near)
    else:
        start, size = rng.randrange(1 << 32), rng.randrange(1 << 32)
    return mbr_entry(type_byte, start, size, boot=rng.choice([0, 0x80]))


async def test_random_mbr_tables() -> None:
    rng = random.Random(1234)
    size = 2 * MiB
    near = size // 512
    for _ in range(300):
        disk = mbr_disk(*(random_mbr_entry(rng, near) for _ in range(4)), size=size)
        for _ in range(rng.randrange(40)):  # EBRs (and junk) scattered over the disk
            put(disk, rng.randrange(near) * 512,
                ebr(*(random_mbr_entry(rng, near // 4) for _ in range(4))))
        table, read = await scan_counting(disk)
        assert table.scheme in ("mbr", "gpt")
        check_invariants(table, size, read)


async def test_random_gpt_entries() -> None:
    rng = random.Random(5678)
    size = 2 * MiB
    last = size // 512 - 1
    for _ in range(150):
        entries = []
        for index in rng.sample(range(128), rng.randrange(12)):
            if rng.random() < 0.8:
                first = rng.randrange(last + 10)
                entries.append(GptEntry(index, first, first + rng.randrange(-5, 2000)
                                        if first > 5 else first))
            else:
                entries.append(GptEntry(index, rng.randrange(1 << 64), rng.randrange(1 << 64)))
        table, read = await scan_counting(build_gpt(size, entries))
        assert table.scheme == "gpt"
        check_invariants(table, size, read)


async def test_random_byte_damage() -> None:
    rng = random.Random(42)
    size = 1 * MiB
    gpt = build_gpt(size, [GptEntry(0, 100, 200), GptEntry(3, 300, 1000)])
    chain = mbr_disk(mbr_entry(0x83, 1, 100), mbr_entry(0x05, 200, 1000), size=size)
    put(chain, 200 * 512, ebr(mbr_entry(0x83, 1, 100), mbr_entry(0x05, 200, 300)))
    put(chain, 400 * 512, ebr(mbr_entry(0x83, 1, 100)))
    for template, hot in ((gpt, [0, 512, 1024]), (chain, [0, 200 * 512, 400 * 512])):
        for _ in range(200):
            disk = bytearray(template)
            for _ in range(rng.randrange(1, 8)):
                disk[rng.choice(hot) + rng.randrange(512)] = rng.randrange(256)
            table, read = await scan_counting(disk)
            check_invariants(table, size, read)
