"""The VHDX region table: where the BAT and the metadata region live (MS-VHDX 2.2.3).

A 64 KiB table (header, then 32-byte entries) checksummed with CRC-32C over all 64 KiB. Two
known regions, both required: the BAT and the metadata region. An unknown region marked
required means the file uses a feature we do not understand: refused, as the spec and QEMU
demand. Regions are MiB aligned and must not overlap each other, the header section or the log.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from vdiskfs.drivers.format.vhdx.crc32c import crc32c_zeroed
from vdiskfs.drivers.format.vhdx.headers import HEADER_SECTION_SIZE, MIB
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "BAT_REGION",
    "METADATA_REGION",
    "REGION_TABLE_OFFSETS",
    "REGION_TABLE_SIZE",
    "Region",
    "RegionTable",
    "parse_region_table",
]

REGION_TABLE_OFFSETS = (192 * 1024, 256 * 1024)
REGION_TABLE_SIZE = 64 * 1024
REGION_SIGNATURE = b"regi"
#: The spec's (and QEMU's) bound on entries: 2047 fill the 64 KiB table after its header.
MAX_REGION_ENTRIES = 2047
BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
_REGION_REQUIRED = 0x1

_TABLE_HEADER = struct.Struct("<4sIII")
_ENTRY = struct.Struct("<16sQII")


@dataclass(frozen=True, slots=True)
class Region:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool

    @property
    def end(self) -> int:
        return self.file_offset + self.length


@dataclass(frozen=True, slots=True)
class RegionTable:
    bat: Region
    metadata: Region


def region_table_problem(data: bytes) -> str | None:
    """Why the 64 KiB ``data`` is not a region table (signature, CRC), or None."""
    if data[:4] != REGION_SIGNATURE:
        return f"signature {data[:4]!r} is not {REGION_SIGNATURE!r}"
    stored = struct.unpack_from("<I", data, 4)[0]
    computed = crc32c_zeroed(data, 4)
    if stored != computed:
        return f"CRC-32C {stored:#010x} does not match the contents ({computed:#010x})"
    return None


def parse_region_table(data: bytes, *, label: str,
                       log_range: tuple[int, int] | None) -> RegionTable:
    """Parse a region table already checked by :func:`region_table_problem`."""
    _signature, _checksum, count, _reserved = _TABLE_HEADER.unpack_from(data)
    if count > MAX_REGION_ENTRIES:
        raise FormatError(f"{count} region table entries (at most {MAX_REGION_ENTRIES})",
                          path=label, field="region_table.entry_count")
    taken: list[tuple[int, int, str]] = [(0, HEADER_SECTION_SIZE, "the header section")]
    if log_range is not None:
        taken.append((log_range[0], log_range[0] + log_range[1], "the log"))
    found: dict[uuid.UUID, Region] = {}
    for i in range(count):
        raw_guid, file_offset, length, flags = _ENTRY.unpack_from(
            data, _TABLE_HEADER.size + i * _ENTRY.size)
        region = Region(uuid.UUID(bytes_le=raw_guid), file_offset, length,
                        bool(flags & _REGION_REQUIRED))
        field = f"region_table[{i}]"
        if region.guid not in (BAT_REGION, METADATA_REGION):
            if region.required:
                raise UnsupportedError(f"required region {region.guid} is not understood",
                                       path=label, field=field)
            continue
        if region.guid in found:
            raise FormatError(f"region {region.guid} appears twice", path=label, field=field)
        if file_offset % MIB or length % MIB or length == 0:
            raise FormatError(f"region {region.guid} ({length} bytes at {file_offset:#x}) is "
                              "not a non-empty, MiB-aligned range", path=label, field=field)
        for start, end, what in taken:
            if file_offset < end and start < region.end:
                raise FormatError(f"region {region.guid} ({length} bytes at {file_offset:#x}) "
                                  f"overlaps {what}", path=label, field=field)
        taken.append((file_offset, region.end, f"region {region.guid}"))
        found[region.guid] = region
    for guid, name in ((BAT_REGION, "BAT"), (METADATA_REGION, "metadata")):
        if guid not in found:
            raise FormatError(f"the required {name} region is missing", path=label,
                              field="region_table")
    return RegionTable(bat=found[BAT_REGION], metadata=found[METADATA_REGION])
