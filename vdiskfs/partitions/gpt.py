"""GUID Partition Tables: header and entry-array validation, primary or backup.

A header is accepted as Linux's ``is_gpt_valid`` (block/partitions/efi.c) accepts it: the
"EFI PART" signature, a header size between 92 bytes and one sector, the header CRC32, ``my_lba``
equal to where it was read, usable LBAs within the disk and in order, then the CRC32 of the entry
array. Two departures, both bounded:

* the entry size may be any ``128 * 2**n`` (the UEFI rule; Linux accepts 128 only), and the
  entry array may be at most :data:`MAX_ENTRY_ARRAY_BYTES` (Linux's bound is ``kmalloc``'s);
* when the primary header or its array is damaged, the backup header at the last LBA is used,
  with a warning, as Linux does only when booted with ``gpt``.

Entries are numbered by index + 1; an entry with a zero type GUID is unused and leaves a gap.
As in Linux's ``is_pte_valid``, an entry whose first or last LBA lies past the disk's last LBA is
skipped (with a warning here); so is one whose last LBA comes before its first.

Decoding and validation (:func:`decode_header`, :func:`header_problem`,
:func:`decode_partitions`) are pure functions of bytes; :func:`scan_gpt` does the reads.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from vdiskfs.partitions.model import MAX_PARTITION_NUMBER, Diagnostics, Partition
from vdiskfs.partitions.reader import SectorReader
from vdiskfs.partitions.typenames import gpt_type_name

__all__ = [
    "GPT_SIGNATURE",
    "MAX_ENTRY_ARRAY_BYTES",
    "GptHeader",
    "GptTable",
    "decode_header",
    "decode_partitions",
    "header_problem",
    "scan_gpt",
]

GPT_SIGNATURE = b"EFI PART"
PRIMARY_HEADER_LBA = 1
#: signature, revision, header size, header CRC32, reserved, my LBA, alternate LBA, first and
#: last usable LBA, disk GUID, entry array LBA, entry count, entry size, entry array CRC32.
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
HEADER_MIN_SIZE = _HEADER.size  # 92
HEADER_CRC_OFFSET = 16
#: type GUID, unique GUID, first LBA, last LBA (inclusive), attributes, name (36 UTF-16LE units).
_ENTRY = struct.Struct("<16s16sQQQ72s")
ENTRY_MIN_SIZE = _ENTRY.size  # 128
#: Largest entry array read. The usual array is 128 entries of 128 bytes (16 KiB); Linux refuses
#: arrays larger than ``KMALLOC_MAX_SIZE`` (4 MiB on x86-64), and so do we.
MAX_ENTRY_ARRAY_BYTES = 4 << 20
ATTRIBUTE_LEGACY_BIOS_BOOTABLE = 1 << 2
_UNUSED_TYPE = bytes(16)


def guid_string(raw: bytes) -> str:
    """An on-disk (mixed-endian) GUID in lowercase canonical form."""
    return str(uuid.UUID(bytes_le=raw))


@dataclass(frozen=True, slots=True)
class GptHeader:
    """A GPT header as stored; nothing in it is checked until :func:`header_problem`."""

    revision: int
    header_size: int
    header_crc32: int
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: str
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc32: int

    @property
    def entries_bytes(self) -> int:
        return self.entry_count * self.entry_size


@dataclass(frozen=True, slots=True)
class GptTable:
    """The header that was used and the partitions of its entry array."""

    header: GptHeader
    partitions: list[Partition]


def decode_header(sector: bytes) -> GptHeader | None:
    """Decode a header sector; ``None`` when it does not start with the GPT signature."""
    if len(sector) < HEADER_MIN_SIZE or not sector.startswith(GPT_SIGNATURE):
        return None
    (_sig, revision, header_size, header_crc, _reserved, my_lba, alternate_lba, first_usable,
     last_usable, disk_guid, entries_lba, entry_count, entry_size,
     entries_crc) = _HEADER.unpack_from(sector)
    return GptHeader(revision, header_size, header_crc, my_lba, alternate_lba, first_usable,
                     last_usable, guid_string(disk_guid), entries_lba, entry_count, entry_size,
                     entries_crc)


def header_crc32(sector: bytes, header_size: int) -> int:
    """CRC32 of the first ``header_size`` bytes with the CRC field taken as zero."""
    crc = zlib.crc32(sector[:HEADER_CRC_OFFSET])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    return zlib.crc32(sector[HEADER_CRC_OFFSET + 4 : header_size], crc)


def header_problem(sector: bytes, header: GptHeader, *, lba: int, last_lba: int) -> str | None:
    """Why the header read at ``lba`` is unusable, or ``None``. Checks everything but the array
    CRC, so that the array is read only once its size and place are known to be sane."""
    sector_size = len(sector)
    if not HEADER_MIN_SIZE <= header.header_size <= sector_size:
        return f"header size {header.header_size} outside {HEADER_MIN_SIZE}-{sector_size}"
    if header_crc32(sector, header.header_size) != header.header_crc32:
        return "header CRC32 mismatch"
    if header.my_lba != lba:
        return f"header says it is at LBA {header.my_lba}, found at LBA {lba}"
    if header.first_usable_lba > last_lba or header.last_usable_lba > last_lba:
        return (f"usable LBAs {header.first_usable_lba}-{header.last_usable_lba} beyond the "
                f"disk's last LBA {last_lba}")
    if header.last_usable_lba < header.first_usable_lba:
        return (f"last usable LBA {header.last_usable_lba} before first usable LBA "
                f"{header.first_usable_lba}")
    size = header.entry_size
    if size < ENTRY_MIN_SIZE or size & (size - 1):
        return f"entry size {size} is not 128 * 2**n bytes"
    if header.entries_bytes > MAX_ENTRY_ARRAY_BYTES:
        return (f"entry array of {header.entry_count} x {size} bytes exceeds the "
                f"{MAX_ENTRY_ARRAY_BYTES >> 20} MiB limit")
    array_sectors = -(-header.entries_bytes // sector_size)
    if header.entry_count and not (
        header.entries_lba > 0 and header.entries_lba + array_sectors - 1 <= last_lba
    ):
        return (f"entry array at LBA {header.entries_lba} ({array_sectors} sectors) lies "
                "outside the disk")
    return None


def _decode_name(raw: bytes) -> str:
    # UTF-16LE up to the first NUL code unit; a lone surrogate becomes U+FFFD, not an error.
    for end in range(0, len(raw), 2):
        if raw[end] == 0 and raw[end + 1] == 0:
            raw = raw[:end]
            break
    return raw.decode("utf-16-le", errors="replace")


def decode_partitions(array: bytes, header: GptHeader, *, sector_size: int, last_lba: int,
                      diag: Diagnostics) -> list[Partition]:
    """Partitions of a CRC-checked entry array, in number order, bad entries skipped."""
    size = header.entry_size
    exposed = min(header.entry_count, MAX_PARTITION_NUMBER)
    partitions: list[Partition] = []
    for index in range(exposed):
        type_raw, unique_raw, first, last, attributes, name_raw = _ENTRY.unpack_from(
            array, index * size
        )
        if type_raw == _UNUSED_TYPE:
            continue
        number = index + 1
        if last < first:
            diag.warn(f"GPT entry {number}: last LBA {last} before first LBA {first}: skipped")
            continue
        if first > last_lba or last > last_lba:
            diag.warn(f"GPT entry {number}: LBAs {first}-{last} extend past the disk's last "
                      f"LBA {last_lba}: skipped")
            continue
        if first < header.first_usable_lba or last > header.last_usable_lba:
            diag.warn(f"GPT entry {number}: LBAs {first}-{last} outside the usable LBAs "
                      f"{header.first_usable_lba}-{header.last_usable_lba}: exposed as Linux "
                      "exposes it")
        type_guid = guid_string(type_raw)
        partitions.append(
            Partition(
                number=number,
                start=first * sector_size,
                size=(last - first + 1) * sector_size,
                scheme="gpt",
                type=type_guid,
                type_name=gpt_type_name(type_guid),
                name=_decode_name(name_raw),
                guid=guid_string(unique_raw),
                bootable=bool(attributes & ATTRIBUTE_LEGACY_BIOS_BOOTABLE),
                attributes=attributes,
                declared_size=(last - first + 1) * sector_size,
            )
        )
    ignored = sum(
        1
        for index in range(exposed, header.entry_count)
        if array[index * size : index * size + 16] != _UNUSED_TYPE
    )
    if ignored:
        diag.warn(f"GPT: {ignored} used entries after entry {MAX_PARTITION_NUMBER} ignored "
                  f"(Linux numbers partitions up to {MAX_PARTITION_NUMBER})")
    return partitions


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The outcome of reading the header at one LBA."""

    lba: int
    #: Why this header is unusable; ``None`` when it and its array are valid.
    problem: str | None
    #: The header, when the header itself passed :func:`header_problem`.
    header: GptHeader | None = None
    array: bytes = b""


async def _load(disk: SectorReader, lba: int) -> _Attempt:
    """Read and check the header at ``lba``, then its entry array."""
    sector = await disk.read(lba)
    if sector is None:
        return _Attempt(lba, f"LBA {lba} is outside the disk")
    header = decode_header(sector)
    if header is None:
        return _Attempt(lba, "no GPT signature")
    problem = header_problem(sector, header, lba=lba, last_lba=disk.last_lba)
    if problem is not None:
        return _Attempt(lba, problem)
    array = b""
    if header.entry_count:
        array_sectors = -(-header.entries_bytes // disk.sector_size)
        data = await disk.read(header.entries_lba, array_sectors)
        if data is None:  # pragma: no cover - header_problem checked the range
            return _Attempt(lba, f"entry array at LBA {header.entries_lba} is outside the disk")
        array = data[: header.entries_bytes]
    if zlib.crc32(array) != header.entries_crc32:
        return _Attempt(lba, f"entry array CRC32 mismatch (array at LBA {header.entries_lba})",
                        header)
    return _Attempt(lba, None, header, array)


async def scan_gpt(disk: SectorReader, diag: Diagnostics) -> GptTable | None:
    """The GPT of ``disk``: the primary at LBA 1, else the backup at the last LBA.

    ``None`` (with a warning) when neither is valid. When the primary is used, the backup it
    points to is checked too, and a damaged or misplaced backup is reported.
    """
    primary = await _load(disk, PRIMARY_HEADER_LBA)
    if primary.problem is None and primary.header is not None:
        await _check_backup(disk, primary.header, diag)
        return GptTable(primary.header, _partitions(disk, primary.header, primary.array, diag))
    candidates = [disk.last_lba]
    # A primary header that is intact but has a damaged array still knows where its backup is.
    if primary.header is not None and primary.header.alternate_lba != disk.last_lba:
        candidates.append(primary.header.alternate_lba)
    reasons = [f"primary at LBA {PRIMARY_HEADER_LBA}: {primary.problem}"]
    for lba in candidates:
        backup = await _load(disk, lba)
        if backup.problem is not None or backup.header is None:
            reasons.append(f"backup at LBA {lba}: {backup.problem}")
            continue
        diag.warn(f"GPT: primary header at LBA {PRIMARY_HEADER_LBA} is invalid "
                  f"({primary.problem}): using the backup at LBA {lba}")
        return GptTable(backup.header, _partitions(disk, backup.header, backup.array, diag))
    diag.warn(f"GPT: no valid header ({'; '.join(reasons)}): no partitions")
    return None


def _partitions(disk: SectorReader, header: GptHeader, array: bytes,
                diag: Diagnostics) -> list[Partition]:
    return decode_partitions(array, header, sector_size=disk.sector_size,
                             last_lba=disk.last_lba, diag=diag)


async def _check_backup(disk: SectorReader, primary: GptHeader, diag: Diagnostics) -> None:
    backup = await _load(disk, primary.alternate_lba)
    if backup.problem is not None or backup.header is None:
        diag.warn(f"GPT: backup header at LBA {primary.alternate_lba} is invalid "
                  f"({backup.problem}): primary used")
        return
    if backup.lba != disk.last_lba:
        diag.warn(f"GPT: backup header at LBA {backup.lba} is not at the end of the disk (last "
                  f"LBA {disk.last_lba}): was the disk resized?")
    header = backup.header
    if header.entries_crc32 != primary.entries_crc32 or header.disk_guid != primary.disk_guid:
        diag.warn("GPT: backup header does not match the primary (entry array or disk GUID "
                  "differ): primary used")
