"""Recipes for VHD (vpc) test images: qemu-img made ones, and hand-built ones from the spec.

QEMU creates fixed and dynamic VHDs but not differencing ones (it cannot even read their
parent), so :func:`build_vhd` writes dynamic and differencing disks from Microsoft's "Virtual
Hard Disk Image Format Specification": footer copy, dynamic header with parent locators, BAT,
bitmap-and-data blocks, footer. A hand-built *dynamic* disk is checked against QEMU's reading,
which validates the builder that the differencing tests rely on.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.images import create, qemu_io

__all__ = [
    "FOOTER",
    "Block",
    "Locator",
    "VhdSpec",
    "build_vhd",
    "footer_checksum",
    "make_vhd",
    "patch_dynamic_header",
    "patch_footer",
    "read_footer",
]

SECTOR = 512
#: cookie, features, version, data offset, timestamp, creator app, creator version, creator
#: OS, original size, current size, cylinders, heads, sectors/track, disk type, checksum, uuid,
#: saved state.
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_FOOTER_FIELDS = ("cookie", "features", "version", "data_offset", "timestamp", "creator_app",
                  "creator_version", "creator_os", "original_size", "current_size", "cylinders",
                  "heads", "sectors", "disk_type", "checksum", "uuid", "saved_state")
DYNAMIC = struct.Struct(">8sQQIIII16sII512s")
_DYNAMIC_FIELDS = ("cookie", "data_offset", "table_offset", "version", "max_table_entries",
                   "block_size", "checksum", "parent_uuid", "parent_timestamp", "reserved",
                   "parent_name")
LOCATOR = struct.Struct(">4sIIIQ")


def make_vhd(path: str | os.PathLike[str], size: int | str, subformat: str = "dynamic", *,
             force_size: bool = False, io: tuple[str, ...] = ()) -> Path:
    """``qemu-img create -f vpc -o subformat=...,force_size=...``, then qemu-io commands."""
    create(path, size, "vpc", subformat=subformat, force_size=force_size)
    if io:
        qemu_io(path, *io, fmt="vpc")
    return Path(path)


def footer_checksum(raw: bytes, at: int) -> int:
    return ~(sum(raw) - sum(raw[at : at + 4])) & 0xFFFF_FFFF


def read_footer(raw: bytes) -> dict[str, object]:
    return dict(zip(_FOOTER_FIELDS, FOOTER.unpack_from(raw), strict=True))


def _pack_footer(values: Mapping[str, object], *, fix_checksum: bool) -> bytes:
    raw = bytearray(SECTOR)
    FOOTER.pack_into(raw, 0, *(values[name] for name in _FOOTER_FIELDS))
    if fix_checksum:
        struct.pack_into(">I", raw, 64, footer_checksum(bytes(raw), 64))
    return bytes(raw)


def patch_footer(path: str | os.PathLike[str], *, fix_checksum: bool = True,
                 **fields: object) -> None:
    """Rewrite footer fields in both copies (offset 0 when present, and the end)."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        places = [size - SECTOR]
        f.seek(0)
        if f.read(8) == b"conectix":
            places.insert(0, 0)
        for place in places:
            f.seek(place)
            values = read_footer(f.read(SECTOR))
            values.update(fields)
            f.seek(place)
            f.write(_pack_footer(values, fix_checksum=fix_checksum))


def patch_dynamic_header(path: str | os.PathLike[str], *, fix_checksum: bool = True,
                         **fields: object) -> None:
    """Rewrite fields of the dynamic header (found through the footer copy at offset 0)."""
    with open(path, "r+b") as f:
        offset = read_footer(f.read(SECTOR))["data_offset"]
        assert isinstance(offset, int)
        f.seek(offset)
        raw = bytearray(f.read(1024))
        values = dict(zip(_DYNAMIC_FIELDS, DYNAMIC.unpack_from(raw), strict=True))
        values.update(fields)
        DYNAMIC.pack_into(raw, 0, *(values[name] for name in _DYNAMIC_FIELDS))
        if fix_checksum:
            struct.pack_into(">I", raw, 36, footer_checksum(bytes(raw), 36))
        f.seek(offset)
        f.write(raw)


@dataclass
class Block:
    """An allocated block: its data (padded to the block size) and which sectors it holds."""

    data: bytes
    #: Sector numbers (within the block) whose bitmap bit is set; None: all of them.
    sectors: set[int] | None = None


@dataclass
class Locator:
    code: bytes
    data: bytes


@dataclass
class VhdSpec:
    size: int
    block_size: int = 64 * 1024
    disk_type: int = 3
    creator_app: bytes = b"win "
    disk_uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    parent_uuid: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))
    parent_name: str = ""
    locators: list[Locator] = field(default_factory=list)


def build_vhd(path: str | os.PathLike[str], spec: VhdSpec, blocks: Mapping[int, Block]) -> Path:
    """Write a dynamic (type 3) or differencing (type 4) VHD.

    The geometry is left at the maximum so that every reader, QEMU included, sizes the disk
    by ``current_size`` (the creator "win " does too).
    """
    block_size = spec.block_size
    entries = -(-spec.size // block_size)
    bitmap_size = -(-block_size // (SECTOR * 8 * SECTOR)) * SECTOR
    header_at = SECTOR
    locator_at = header_at + 1024
    locator_area = bytearray()
    locator_entries = []
    for locator in spec.locators:
        data = locator.data
        padded = data + bytes(-len(data) % SECTOR)
        locator_entries.append(
            LOCATOR.pack(locator.code, len(padded), len(data), 0,
                         locator_at + len(locator_area))
        )
        locator_area += padded
    table_at = locator_at + len(locator_area)
    bat_bytes = entries * 4
    data_at = table_at + bat_bytes + (-bat_bytes % SECTOR)
    bat = [0xFFFF_FFFF] * entries
    body = bytearray()
    for index in sorted(blocks):
        block = blocks[index]
        bat[index] = (data_at + len(body)) // SECTOR
        bitmap = bytearray(bitmap_size)
        for sector in range(block_size // SECTOR):
            if block.sectors is None or sector in block.sectors:
                bitmap[sector >> 3] |= 0x80 >> (sector & 7)
        body += bitmap + block.data.ljust(block_size, b"\0")
    footer_values: dict[str, object] = {
        "cookie": b"conectix", "features": 2, "version": 0x00010000, "data_offset": header_at,
        "timestamp": 0, "creator_app": spec.creator_app, "creator_version": 0x00050003,
        "creator_os": b"Wi2k", "original_size": spec.size, "current_size": spec.size,
        "cylinders": 65535, "heads": 16, "sectors": 255, "disk_type": spec.disk_type,
        "checksum": 0, "uuid": spec.disk_uuid.bytes, "saved_state": 0,
    }
    footer = _pack_footer(footer_values, fix_checksum=True)
    header = bytearray(1024)
    DYNAMIC.pack_into(header, 0, b"cxsparse", 0xFFFF_FFFF_FFFF_FFFF, table_at, 0x00010000,
                      entries, block_size, 0, spec.parent_uuid.bytes, 0, 0,
                      spec.parent_name.encode("utf-16-be"))
    for i, entry in enumerate(locator_entries):
        header[576 + 24 * i : 600 + 24 * i] = entry
    struct.pack_into(">I", header, 36, footer_checksum(bytes(header), 36))
    table = struct.pack(f">{entries}I", *bat) + bytes(-bat_bytes % SECTOR)
    image = footer + bytes(header) + bytes(locator_area) + table + bytes(body) + footer
    Path(path).write_bytes(image)
    return Path(path)
