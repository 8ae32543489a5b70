"""MBR (``msdos``) partition tables: the boot record, primaries, and the EBR chain of logicals.

Numbering and acceptance follow Linux's ``block/partitions/msdos.c``:

* A slot is used when its sector count is non-zero, whatever its type byte. Primaries are
  numbered by slot, 1-4, so an empty slot leaves a gap.
* An extended partition (type 0x05, 0x0f or 0x85) keeps its slot number and is exposed as Linux
  exposes it: a window of two 512-byte sectors (1 KiB) or one logical sector if larger, over its
  first EBR -- enough for a boot loader, never the logical partitions' data.
* Logical partitions are numbered from 5 in chain order. Each EBR's data entries are relative to
  that EBR; its link entry (the first extended entry) is relative to the start of the extended
  partition. Slots 3 and 4 of an EBR often hold garbage, so an entry there must lie within both
  the EBR's extent and the extended partition, as Linux requires.

The chain is bounded as Linux bounds it -- at most 100 links in a row without a data partition,
and numbers up to :data:`~vdiskfs.partitions.model.MAX_PARTITION_NUMBER` -- and, unlike Linux, a
link back to an EBR already read ends the chain with a warning instead of repeating its
partitions until the number limit.

Decoding (:func:`decode_boot_record`) is pure; :func:`scan_mbr` does the I/O of the chain walk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vdiskfs.partitions.model import MAX_PARTITION_NUMBER, Diagnostics, Partition
from vdiskfs.partitions.reader import SectorReader
from vdiskfs.partitions.typenames import mbr_type_name

__all__ = [
    "EXTENDED_TYPES",
    "PROTECTIVE_TYPE",
    "BootRecord",
    "MbrEntry",
    "decode_boot_record",
    "looks_like_fat_boot_sector",
    "scan_mbr",
]

#: Bytes of the boot record that hold the table; the rest of a larger sector is ignored.
BOOT_RECORD_SIZE = 512
#: The 0x55 0xAA signature at bytes 510-511 of an MBR and of every EBR.
BOOT_SIGNATURE = b"\x55\xaa"
SIGNATURE_OFFSET = 510
DISK_SIGNATURE_OFFSET = 440
ENTRY_TABLE_OFFSET = 446
#: One 16-byte entry: boot indicator, CHS start, type, CHS end, LBA start, sector count.
_ENTRY = struct.Struct("<B3sB3sII")

#: DOS (0x05), W95 LBA (0x0f) and Linux (0x85) extended partitions: what Linux follows.
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
#: The GPT protective entry: a disk holding one is read as GPT.
PROTECTIVE_TYPE = 0xEE
BOOT_INDICATOR_ACTIVE = 0x80
#: Links followed in a row without finding a data partition before the walk gives up, as
#: Linux's ``parse_extended`` counts them (``loopct``).
MAX_EMPTY_EBR_LINKS = 100
#: Bytes Linux exposes of an extended partition on a 512-byte-sector disk ("leave room for
#: LILO"); on larger sectors, one logical sector.
EXTENDED_WINDOW = 1024
FIRST_LOGICAL_NUMBER = 5


@dataclass(frozen=True, slots=True)
class MbrEntry:
    """One slot of an MBR or EBR, as stored (in logical sectors, unchecked)."""

    #: 1-4, the slot in its boot record.
    slot: int
    boot_indicator: int
    type: int
    start_lba: int
    sectors: int

    @property
    def used(self) -> bool:
        # Linux tests the count only: a type 0x00 entry with sectors is still a partition.
        return self.sectors != 0

    @property
    def is_extended(self) -> bool:
        return self.type in EXTENDED_TYPES


@dataclass(frozen=True, slots=True)
class BootRecord:
    """A sector with the 0x55AA signature, read as an MBR or EBR."""

    entries: tuple[MbrEntry, MbrEntry, MbrEntry, MbrEntry]
    #: The 32-bit disk signature at byte 440 (meaningful in the MBR only).
    disk_signature: int

    def protective_entry(self) -> MbrEntry | None:
        for entry in self.entries:
            if entry.type == PROTECTIVE_TYPE:
                return entry
        return None

    def invalid_boot_indicator(self) -> MbrEntry | None:
        """The first slot whose boot indicator is neither 0 nor 0x80: then this is no table."""
        for entry in self.entries:
            if entry.boot_indicator not in (0, BOOT_INDICATOR_ACTIVE):
                return entry
        return None


def decode_boot_record(sector: bytes) -> BootRecord | None:
    """Decode the first 512 bytes of ``sector``; ``None`` when the 0x55AA signature is missing."""
    if len(sector) < BOOT_RECORD_SIZE:
        return None
    if sector[SIGNATURE_OFFSET : SIGNATURE_OFFSET + 2] != BOOT_SIGNATURE:
        return None
    entries = []
    for index in range(4):
        boot, _chs_first, type_byte, _chs_last, start, count = _ENTRY.unpack_from(
            sector, ENTRY_TABLE_OFFSET + index * _ENTRY.size
        )
        entries.append(MbrEntry(index + 1, boot, type_byte, start, count))
    (disk_signature,) = struct.unpack_from("<I", sector, DISK_SIGNATURE_OFFSET)
    return BootRecord((entries[0], entries[1], entries[2], entries[3]), disk_signature)


def looks_like_fat_boot_sector(sector: bytes) -> bool:
    """Whether a sector that failed the boot-indicator test is a whole-disk FAT file system.

    Linux's test in ``msdos_partition``: reserved sectors and FAT count non-zero, and a valid
    media byte (0xf0 or 0xf8-0xff).
    """
    if len(sector) < BOOT_RECORD_SIZE:
        return False
    (reserved,) = struct.unpack_from("<H", sector, 14)
    fats, media = sector[16], sector[21]
    return bool(reserved) and bool(fats) and (media == 0xF0 or media >= 0xF8)


def _type_string(type_byte: int) -> str:
    return f"0x{type_byte:02x}"


def _partition(entry: MbrEntry, number: int, start_lba: int, sector_size: int, *,
               logical: bool = False) -> Partition:
    size = entry.sectors * sector_size
    return Partition(
        number=number,
        start=start_lba * sector_size,
        size=size,
        scheme="mbr",
        type=_type_string(entry.type),
        type_name=mbr_type_name(entry.type),
        bootable=entry.boot_indicator == BOOT_INDICATOR_ACTIVE,
        logical=logical,
        declared_size=size,
    )


async def scan_mbr(disk: SectorReader, record: BootRecord, diag: Diagnostics) -> list[Partition]:
    """Partitions of the MBR ``record`` (read from sector 0 of ``disk``), logicals included.

    Entries are returned as the table declares them, in number order; checking them against
    the size of the disk is the caller's (as in Linux, where ``blk_add_partition`` does it).
    """
    sector_size = disk.sector_size
    partitions: list[Partition] = []
    next_logical = FIRST_LOGICAL_NUMBER
    for entry in record.entries:
        if not entry.used:
            if entry.type != 0:
                diag.warn(f"MBR slot {entry.slot}: type {_type_string(entry.type)} with 0 "
                          "sectors: skipped")
            continue
        if entry.type == 0:
            diag.warn(f"MBR slot {entry.slot}: type 0x00 (empty) with {entry.sectors} sectors: "
                      "exposed as Linux exposes it")
        if not entry.is_extended:
            partitions.append(_partition(entry, entry.slot, entry.start_lba, sector_size))
            continue
        whole = _partition(entry, entry.slot, entry.start_lba, sector_size)
        window = min(whole.size, max(sector_size, EXTENDED_WINDOW))
        partitions.append(
            Partition(
                number=entry.slot,
                start=whole.start,
                size=window,
                scheme="mbr",
                type=whole.type,
                type_name=whole.type_name,
                bootable=whole.bootable,
                extended=True,
                declared_size=whole.size,
            )
        )
        logicals = await _scan_ebr_chain(disk, entry, next_logical, diag)
        partitions.extend(logicals)
        next_logical += len(logicals)
    partitions.sort(key=lambda p: p.number)
    return partitions


async def _scan_ebr_chain(disk: SectorReader, extended: MbrEntry, first_number: int,
                          diag: Diagnostics) -> list[Partition]:
    """Logical partitions of one extended partition, numbered from ``first_number``."""
    ext_first, ext_sectors = extended.start_lba, extended.sectors
    ext_end = ext_first + ext_sectors
    where = f"extended partition {extended.slot}"
    found: list[Partition] = []
    number = first_number
    this_lba, this_sectors = ext_first, ext_sectors
    visited: set[int] = set()
    empty_links = 0
    # Bounded: every pass either adds a partition (at most 251 numbers) or counts an empty link
    # (at most MAX_EMPTY_EBR_LINKS in a row).
    while True:
        empty_links += 1
        if empty_links > MAX_EMPTY_EBR_LINKS:
            diag.warn(f"{where}: more than {MAX_EMPTY_EBR_LINKS} EBRs in a row without a "
                      f"partition (at sector {this_lba}): rest of the chain ignored")
            break
        if this_lba in visited:
            diag.warn(f"{where}: EBR chain loops back to sector {this_lba}: rest of the chain "
                      "ignored")
            break
        visited.add(this_lba)
        sector = await disk.read(this_lba)
        if sector is None:
            diag.warn(f"{where}: EBR at sector {this_lba} is outside the disk: rest of the "
                      "chain ignored")
            break
        ebr = decode_boot_record(sector)
        if ebr is None:
            # Linux stops here silently; a link to a sector without a signature is damage.
            diag.warn(f"{where}: no 0x55AA signature in the EBR at sector {this_lba}: rest of "
                      "the chain ignored")
            break
        for entry in ebr.entries:
            if not entry.used or entry.is_extended:
                continue
            first = this_lba + entry.start_lba
            if entry.slot >= 3 and (
                entry.start_lba + entry.sectors > this_sectors
                or first < ext_first
                or first + entry.sectors > ext_end
            ):
                diag.warn(f"{where}: EBR at sector {this_lba}, slot {entry.slot}: entry lies "
                          "outside its EBR's extent (slots 3-4 often hold garbage): skipped")
                continue
            if number > MAX_PARTITION_NUMBER:
                diag.warn(f"{where}: more logical partitions than Linux numbers (up to "
                          f"{MAX_PARTITION_NUMBER}): rest of the chain ignored")
                return found
            if first < ext_first or first + entry.sectors > ext_end:
                diag.warn(f"logical partition {number} (sectors {first}-"
                          f"{first + entry.sectors - 1}) lies outside {where} (sectors "
                          f"{ext_first}-{ext_end - 1}): exposed as Linux exposes it")
            found.append(_partition(entry, number, first, disk.sector_size, logical=True))
            number += 1
            empty_links = 0
        link = next((e for e in ebr.entries if e.used and e.is_extended), None)
        if link is None:
            break
        this_lba, this_sectors = ext_first + link.start_lba, link.sectors
    return found
