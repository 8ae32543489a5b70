"""The VHDX metadata region: disk size, block size, sector sizes, parent locator (MS-VHDX 2.6).

The region starts with a 64 KiB table (a 32-byte header, then 32-byte entries naming items by
GUID, with an offset into the region and a length); the items follow. Five items are required
and QEMU refuses a file without any of them; a differencing file adds the parent locator. An
unknown item marked required is refused.

Everything here is pure: functions take the bytes of the table and of the items.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from vdiskfs.drivers.format.vhdx.headers import MIB
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "METADATA_TABLE_SIZE",
    "DiskParameters",
    "MetadataItem",
    "ParentLocator",
    "parse_disk_parameters",
    "parse_metadata_table",
    "parse_parent_locator",
]

METADATA_TABLE_SIZE = 64 * 1024
METADATA_SIGNATURE = b"metadata"
MAX_METADATA_ENTRIES = 2047
#: The spec bounds an item at 1 MiB.
MAX_ITEM_LENGTH = MIB

FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
#: The one parent locator type the spec defines: the parent is a VHDX file.
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

ITEM_NAMES = {
    FILE_PARAMETERS: "file_parameters",
    VIRTUAL_DISK_SIZE: "virtual_disk_size",
    PAGE83_DATA: "page83_data",
    LOGICAL_SECTOR_SIZE: "logical_sector_size",
    PHYSICAL_SECTOR_SIZE: "physical_sector_size",
    PARENT_LOCATOR: "parent_locator",
}
REQUIRED_ITEMS = (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA, LOGICAL_SECTOR_SIZE,
                  PHYSICAL_SECTOR_SIZE)
_ITEM_IS_REQUIRED = 0x4

MIN_BLOCK_SIZE = MIB
MAX_BLOCK_SIZE = 256 * MIB
#: The spec's largest virtual disk: 64 TiB. Bounds the BAT.
MAX_VIRTUAL_DISK_SIZE = 64 << 40
SECTOR_SIZES = (512, 4096)
FLAG_LEAVE_BLOCKS_ALLOCATED = 0x1
FLAG_HAS_PARENT = 0x2

_TABLE_HEADER = struct.Struct("<8sHH20x")
_ENTRY = struct.Struct("<16sIII4x")
_LOCATOR_HEADER = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")


@dataclass(frozen=True, slots=True)
class MetadataItem:
    guid: uuid.UUID
    #: Offset from the start of the metadata region.
    offset: int
    length: int
    required: bool

    @property
    def name(self) -> str:
        return ITEM_NAMES.get(self.guid, str(self.guid))


def parse_metadata_table(table: bytes, *, region_length: int,
                         label: str) -> dict[uuid.UUID, MetadataItem]:
    """The known items of the 64 KiB metadata table, each checked to lie inside the region."""
    signature, _reserved, count = _TABLE_HEADER.unpack_from(table)
    if signature != METADATA_SIGNATURE:
        raise FormatError(f"metadata table signature {signature!r} is not "
                          f"{METADATA_SIGNATURE!r}", path=label, field="metadata_table")
    if count > MAX_METADATA_ENTRIES:
        raise FormatError(f"{count} metadata entries (at most {MAX_METADATA_ENTRIES})",
                          path=label, field="metadata_table.entry_count")
    items: dict[uuid.UUID, MetadataItem] = {}
    for i in range(count):
        raw_guid, offset, length, flags = _ENTRY.unpack_from(
            table, _TABLE_HEADER.size + i * _ENTRY.size)
        item = MetadataItem(uuid.UUID(bytes_le=raw_guid), offset, length,
                            bool(flags & _ITEM_IS_REQUIRED))
        field = f"metadata_table[{i}]"
        if item.guid not in ITEM_NAMES:
            if item.required:
                raise UnsupportedError(f"required metadata item {item.guid} is not understood",
                                       path=label, field=field)
            continue
        if item.guid in items:
            raise FormatError(f"metadata item {item.name} appears twice", path=label,
                              field=field)
        if (length > MAX_ITEM_LENGTH or (length and offset < METADATA_TABLE_SIZE)
                or offset + length > region_length):
            raise FormatError(f"metadata item {item.name} ({length} bytes at {offset:#x}) lies "
                              f"outside the metadata region ({region_length} bytes) or in its "
                              "table", path=label, field=field)
        items[item.guid] = item
    for guid in REQUIRED_ITEMS:
        if guid not in items:
            raise UnsupportedError(f"the required metadata item {ITEM_NAMES[guid]} is missing",
                                   path=label, field="metadata_table")
    return items


@dataclass(frozen=True, slots=True)
class DiskParameters:
    """The fixed-size metadata items, validated."""

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    logical_sector_size: int
    physical_sector_size: int
    #: The page 83 data: the virtual disk's identity.
    virtual_disk_id: uuid.UUID


def parse_disk_parameters(items: dict[uuid.UUID, bytes], *, label: str) -> DiskParameters:
    """Decode and check the five required items (given as their bytes) as QEMU does."""

    def item(guid: uuid.UUID, size: int) -> bytes:
        data = items[guid]
        if len(data) < size:
            raise FormatError(f"metadata item {ITEM_NAMES[guid]} is {len(data)} bytes, needs "
                              f"{size}", path=label, field=ITEM_NAMES[guid])
        return data

    block_size, flags = struct.unpack_from("<II", item(FILE_PARAMETERS, 8))
    (disk_size,) = struct.unpack_from("<Q", item(VIRTUAL_DISK_SIZE, 8))
    (logical,) = struct.unpack_from("<I", item(LOGICAL_SECTOR_SIZE, 4))
    (physical,) = struct.unpack_from("<I", item(PHYSICAL_SECTOR_SIZE, 4))
    disk_id = uuid.UUID(bytes_le=item(PAGE83_DATA, 16)[:16])
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise FormatError(f"block size {block_size} is not a power of two in [1 MiB, 256 MiB]",
                          path=label, field="file_parameters.block_size")
    if logical not in SECTOR_SIZES:
        raise FormatError(f"logical sector size {logical} is not 512 or 4096", path=label,
                          field="logical_sector_size")
    if physical not in SECTOR_SIZES:
        raise FormatError(f"physical sector size {physical} is not 512 or 4096", path=label,
                          field="physical_sector_size")
    if disk_size % logical or disk_size > MAX_VIRTUAL_DISK_SIZE:
        raise FormatError(f"virtual disk size {disk_size} is not a multiple of the {logical}-"
                          "byte sector no larger than 64 TiB", path=label,
                          field="virtual_disk_size")
    return DiskParameters(
        block_size=block_size,
        leave_blocks_allocated=bool(flags & FLAG_LEAVE_BLOCKS_ALLOCATED),
        has_parent=bool(flags & FLAG_HAS_PARENT),
        virtual_disk_size=disk_size,
        logical_sector_size=logical,
        physical_sector_size=physical,
        virtual_disk_id=disk_id,
    )


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """A VHDX parent locator (MS-VHDX 2.6.2.6): its key/value entries."""

    entries: dict[str, str]

    @property
    def parent_linkage(self) -> uuid.UUID:
        return _parse_braced_guid(self.entries["parent_linkage"])

    @property
    def parent_linkage2(self) -> uuid.UUID | None:
        value = self.entries.get("parent_linkage2")
        return None if value is None else _parse_braced_guid(value)

    def paths(self) -> list[tuple[str, str]]:
        """``(key, path)`` candidates in the spec's order, converted for a POSIX host.

        ``relative_path`` uses ``\\`` separators; ``absolute_win32_path`` is used only when it
        is not tied to a drive letter or volume (``\\\\?\\C:\\...`` cannot name a file here);
        ``volume_path`` never can.
        """
        out: list[tuple[str, str]] = []
        relative = self.entries.get("relative_path")
        if relative:
            out.append(("relative_path", relative.replace("\\", "/")))
        absolute = self.entries.get("absolute_win32_path")
        if absolute:
            path = absolute.removeprefix("\\\\?\\")
            if not (len(path) >= 2 and path[1] == ":") and not path.startswith("\\\\"):
                out.append(("absolute_win32_path", path.replace("\\", "/")))
        return out


def _parse_braced_guid(value: str) -> uuid.UUID:
    text = value.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"{value!r} is not a braced GUID")
    return uuid.UUID(text[1:-1])


def parse_parent_locator(data: bytes, *, label: str) -> ParentLocator:
    """Parse the parent locator item; every offset and length is checked against the item."""
    field = "parent_locator"
    if len(data) < _LOCATOR_HEADER.size:
        raise FormatError(f"parent locator of {len(data)} bytes is shorter than its header",
                          path=label, field=field)
    raw_type, _reserved, count = _LOCATOR_HEADER.unpack_from(data)
    locator_type = uuid.UUID(bytes_le=raw_type)
    if locator_type != VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedError(f"parent locator type {locator_type} is not the VHDX type",
                               path=label, field=f"{field}.locator_type")
    if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(data):
        raise FormatError(f"{count} parent locator entries do not fit the {len(data)}-byte "
                          "item", path=label, field=f"{field}.key_value_count")
    entries: dict[str, str] = {}
    for i in range(count):
        key_offset, value_offset, key_length, value_length = _LOCATOR_ENTRY.unpack_from(
            data, _LOCATOR_HEADER.size + i * _LOCATOR_ENTRY.size)
        key = _utf16(data, key_offset, key_length, label, f"{field}.entry[{i}].key")
        value = _utf16(data, value_offset, value_length, label, f"{field}.entry[{i}].value")
        if key in entries:
            raise FormatError(f"parent locator key {key!r} appears twice", path=label,
                              field=f"{field}.entry[{i}].key")
        entries[key] = value
    locator = ParentLocator(entries)
    if "parent_linkage" not in entries:
        raise FormatError("parent locator has no parent_linkage", path=label,
                          field=f"{field}.parent_linkage")
    for key in ("parent_linkage", "parent_linkage2"):
        if key in entries:
            try:
                _parse_braced_guid(entries[key])
            except ValueError:
                raise FormatError(f"{key} {entries[key]!r} is not a GUID in braces",
                                  path=label, field=f"{field}.{key}") from None
    if not locator.paths() and "volume_path" not in entries:
        raise FormatError("parent locator names no path to the parent (relative_path, "
                          "volume_path or absolute_win32_path)", path=label, field=field)
    return locator


def _utf16(data: bytes, offset: int, length: int, label: str, field: str) -> str:
    if length == 0 or length % 2 or offset < _LOCATOR_HEADER.size or offset + length > len(data):
        raise FormatError(f"string of {length} bytes at {offset} is empty, odd or outside the "
                          f"{len(data)}-byte parent locator", path=label, field=field)
    try:
        return data[offset : offset + length].decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise FormatError(f"string is not valid UTF-16: {exc.reason}", path=label,
                          field=field) from None
