"""Structures of a VHD ("vpc") image: footer, dynamic disk header, parent locators.

From Microsoft's "Virtual Hard Disk Image Format Specification" (2006) and QEMU's
``block/vpc.c``. All fields are big endian::

    fixed:         [ guest data ............................ ][ footer ]
    dynamic/diff:  [ footer copy ][ dynamic header ][ BAT ][ bitmap+block ... ][ footer ]

The BAT holds one u32 per block: the sector of the block's sector bitmap, the block's data
following it, or ``0xFFFFFFFF`` when unallocated. Functions here parse and check bytes; none
reads a file.
"""

from __future__ import annotations

import enum
import posixpath
import struct
import sys
import uuid
from array import array
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "BAT_UNALLOCATED",
    "DYNAMIC_HEADER_SIZE",
    "FOOTER_COOKIE",
    "FOOTER_SIZE",
    "MAX_LOCATOR_DATA",
    "DiskType",
    "DynamicHeader",
    "Footer",
    "ParentLocator",
    "SizeSource",
    "check_virtual_size",
    "checksum",
    "locator_reference",
    "parent_candidates",
    "parse_bat",
    "parse_dynamic_header",
    "parse_footer",
    "probe_footer",
    "virtual_size",
]

FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
BAT_UNALLOCATED = 0xFFFF_FFFF
SECTOR = 512

#: QEMU's VHD_MAX_SECTORS: 2040 GiB, the largest disk a VHD can address.
MAX_SECTORS = 0xFF000000
#: QEMU's VHD_MAX_GEOMETRY (65535 cylinders, 16 heads, 255 sectors): a disk this large cannot be
#: described by its geometry, so its footer's current size is used instead.
MAX_GEOMETRY_SECTORS = 65535 * 16 * 255
#: A parent locator's data is a path: refuse anything longer than this.
MAX_LOCATOR_DATA = 64 * 1024

# cookie, features, version, data offset, timestamp, creator app, creator version, creator OS,
# original size, current size, cylinders, heads, sectors per track, disk type, checksum, uuid,
# saved state.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_FOOTER_CHECKSUM_AT = 64
# cookie, data offset, table offset, version, max table entries, block size, checksum,
# parent uuid, parent timestamp, reserved, parent unicode name (UTF-16BE).
_DYNAMIC = struct.Struct(">8sQQIIII16sII512s")
_DYNAMIC_CHECKSUM_AT = 36
_LOCATOR = struct.Struct(">4sIIIQ")
_LOCATORS_AT = 576
_LOCATOR_COUNT = 8


class DiskType(enum.IntEnum):
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


class SizeSource(enum.StrEnum):
    """Where QEMU takes the virtual size from."""

    GEOMETRY = "chs"
    CURRENT_SIZE = "current_size"


# Creator applications that size the disk by the footer's current size (QEMU's table in
# vpc_open): Hyper-V, QEMU with force_size, Disk2vhd, XenConverter, XenServer. Every other
# creator -- Virtual PC ("vpc "), QEMU without force_size ("qemu") -- is sized by the geometry.
_CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def checksum(data: bytes, at: int) -> int:
    """One's complement of the byte sum, the 4 checksum bytes at ``at`` counted as zero."""
    total = sum(data) - sum(data[at : at + 4])
    return ~total & 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Footer:
    """A checked hard disk footer."""

    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: DiskType
    checksum: int
    uuid: uuid.UUID
    saved_state: int

    @property
    def geometry_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track


def _raw_footer(raw: bytes) -> tuple[Any, ...] | None:
    if len(raw) < FOOTER_SIZE or raw[:8] != FOOTER_COOKIE:
        return None
    return _FOOTER.unpack_from(raw)


def probe_footer(raw: bytes, *, fixed_only: bool) -> bool:
    """Whether ``raw`` is an intact footer (cookie and checksum; disk type fixed if asked)."""
    fields = _raw_footer(raw)
    if fields is None:
        return False
    stored = fields[14]
    if checksum(raw[:FOOTER_SIZE], _FOOTER_CHECKSUM_AT) != stored:
        return False
    return not fixed_only or fields[13] == DiskType.FIXED


def parse_footer(raw: bytes, label: str, *, where: str) -> Footer:
    """Parse and check a footer (``where``: "footer" or "footer copy", for the messages)."""
    fields = _raw_footer(raw)
    if fields is None:
        raise FormatError(f"no VHD {where} (cookie {FOOTER_COOKIE!r} missing)", path=label,
                          field=f"{where}.cookie")
    (_cookie, features, version, data_offset, timestamp, creator_app, creator_version,
     creator_os, original_size, current_size, cylinders, heads, spt, disk_type, stored,
     raw_uuid, saved_state) = fields
    computed = checksum(raw[:FOOTER_SIZE], _FOOTER_CHECKSUM_AT)
    if computed != stored:
        raise FormatError(f"{where} checksum {stored:#010x} is wrong (computed {computed:#010x})",
                          path=label, field=f"{where}.checksum")
    try:
        kind = DiskType(disk_type)
    except ValueError:
        raise UnsupportedError(f"VHD disk type {disk_type}", path=label,
                               field=f"{where}.disk_type") from None
    return Footer(features, version, data_offset, timestamp, creator_app, creator_version,
                  creator_os, original_size, current_size, cylinders, heads, spt, kind, stored,
                  uuid.UUID(bytes=raw_uuid), saved_state)


def virtual_size(footer: Footer) -> tuple[int, SizeSource]:
    """The guest size as QEMU 7.2's ``vpc_open`` computes it, and where it came from.

    Virtual PC sizes a disk by its CHS geometry, which rounds the size down; Hyper-V and others
    use the footer's current size. QEMU decides by the creator application, and uses the
    current size for any disk whose geometry is the maximum (it may be larger).
    """
    sectors = footer.geometry_sectors
    if footer.creator_app in _CURRENT_SIZE_CREATORS or sectors == MAX_GEOMETRY_SECTORS:
        return footer.current_size // SECTOR * SECTOR, SizeSource.CURRENT_SIZE
    return sectors * SECTOR, SizeSource.GEOMETRY


def check_virtual_size(size: int, label: str) -> None:
    if size > MAX_SECTORS * SECTOR:
        raise UnsupportedError(f"virtual size {size} is larger than the 2040 GiB a VHD allows",
                               path=label, field="footer.current_size")


class Platform(enum.Enum):
    """Parent locator platform codes, as the VHD specification names them."""

    W2RU = b"W2ru"  # relative Windows path, UTF-16LE
    W2KU = b"W2ku"  # absolute Windows path, UTF-16LE
    WI2R = b"Wi2r"  # relative Windows path, deprecated single-byte form
    WI2K = b"Wi2k"  # absolute Windows path, deprecated single-byte form
    MACX = b"MacX"  # file URL, UTF-8
    MAC = b"Mac "  # Mac OS alias record: opaque, not readable here


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """One of the eight parent locator entries; ``code`` as stored."""

    code: bytes
    data_space: int
    data_length: int
    data_offset: int
    index: int

    @property
    def platform(self) -> Platform | None:
        try:
            return Platform(self.code)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    """A checked dynamic disk header."""

    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_uuid: uuid.UUID
    parent_timestamp: int
    parent_name: str
    locators: tuple[ParentLocator, ...]

    @property
    def bitmap_size(self) -> int:
        """Bytes of a block's sector bitmap: one bit per sector, padded to a sector.

        (QEMU computes 0 for blocks under 4 KiB, which QEMU itself never creates; the
        specification's padding is used here.)
        """
        return -(-self.block_size // (8 * SECTOR * SECTOR)) * SECTOR


def parse_dynamic_header(raw: bytes, label: str) -> DynamicHeader:
    """Parse and check the dynamic disk header (cookie, checksum, block size)."""
    if len(raw) < DYNAMIC_HEADER_SIZE or raw[:8] != DYNAMIC_COOKIE:
        raise FormatError(f"bad dynamic header cookie {raw[:8]!r} (expected "
                          f"{DYNAMIC_COOKIE!r})", path=label, field="dynamic_header.cookie")
    (_cookie, data_offset, table_offset, version, max_entries, block_size, stored, parent_uuid,
     parent_timestamp, _reserved, parent_name) = _DYNAMIC.unpack_from(raw)
    computed = checksum(raw[:DYNAMIC_HEADER_SIZE], _DYNAMIC_CHECKSUM_AT)
    if computed != stored:
        raise FormatError(f"dynamic header checksum {stored:#010x} is wrong (computed "
                          f"{computed:#010x})", path=label, field="dynamic_header.checksum")
    if block_size < SECTOR or block_size & (block_size - 1):
        raise FormatError(f"block size {block_size} is not a power of two of at least 512",
                          path=label, field="dynamic_header.block_size")
    locators = []
    for index in range(_LOCATOR_COUNT):
        code, space, length, _unused, offset = _LOCATOR.unpack_from(
            raw, _LOCATORS_AT + index * _LOCATOR.size
        )
        locators.append(ParentLocator(code, space, length, offset, index))
    name = parent_name.decode("utf-16-be", errors="replace").split("\0", 1)[0]
    return DynamicHeader(data_offset, table_offset, version, max_entries, block_size, stored,
                         uuid.UUID(bytes=parent_uuid), parent_timestamp, name, tuple(locators))


def _windows_path(text: str) -> tuple[str, bool]:
    """A Windows path as a POSIX reference, and whether it was absolute."""
    path = text.replace("\\", "/")
    absolute = path.startswith("//") or (len(path) >= 2 and path[1] == ":")
    return path, absolute


def locator_reference(locator: ParentLocator, data: bytes, label: str
                      ) -> tuple[str, bool] | None:
    """Decode a parent locator's data to ``(reference, absolute)``; None for a platform this
    module cannot read (``Mac `` aliases, unknown codes) or an empty path.

    ``absolute`` marks a path of another machine (``C:\\vms\\base.vhd``): the caller can only
    look for its file name beside the child. Total: data that is not what its platform code
    promises (an odd number of UTF-16 bytes, a lone surrogate, a malformed URL) is a
    :class:`FormatError` naming ``label`` and the locator; NUL padding after the path is normal.
    """
    platform = locator.platform
    field = f"parent_locator[{locator.index}]"
    if platform in (Platform.W2RU, Platform.W2KU):
        # Strict UTF-16: a lone surrogate would survive decoding with surrogatepass, only to
        # fail as an unencodable file name at the open.
        if len(data) % 2:
            raise FormatError(f"{platform.value.decode()} locator of {len(data)} bytes: UTF-16 "
                              "text has an even number of bytes", path=label, field=field)
        try:
            text = data.decode("utf-16-le").split("\0", 1)[0]
        except UnicodeDecodeError as exc:
            raise FormatError(f"{platform.value.decode()} locator is not valid UTF-16 "
                              f"({exc.reason} at byte {exc.start})", path=label,
                              field=field) from None
        path, absolute = _windows_path(text)
    elif platform in (Platform.WI2R, Platform.WI2K):
        # surrogateescape: any bytes survive as a file name, as the file system takes them.
        text = data.decode("utf-8", errors="surrogateescape").split("\0", 1)[0]
        path, absolute = _windows_path(text)
    elif platform is Platform.MACX:
        text = data.decode("utf-8", errors="surrogateescape").split("\0", 1)[0]
        try:
            parts = urlsplit(text)
        except ValueError as exc:  # "Invalid IPv6 URL" and the like
            raise FormatError(f"MacX locator is not a file URL: {exc}", path=label,
                              field=field) from None
        if parts.scheme not in ("file", ""):
            return None
        path, absolute = unquote(parts.path, errors="surrogateescape"), True
    else:
        return None
    if not path:
        return None
    return path, absolute


def parse_bat(data: bytes) -> array[int]:
    """The block allocation table: big-endian u32 entries, as a compact array."""
    table = array("I")
    if table.itemsize != 4:  # pragma: no cover - every Linux ABI has a 4-byte "I"
        raise RuntimeError("array typecode I is not 4 bytes here")
    table.frombytes(data[: len(data) - len(data) % 4])
    if sys.byteorder == "little":
        table.byteswap()
    return table


#: The order in which parent references are tried: relative paths first (they survive moving
#: the pair of files), then absolute ones, then the bare parent name of the header.
_PLATFORM_PREFERENCE = (Platform.W2RU, Platform.WI2R, Platform.MACX, Platform.W2KU,
                        Platform.WI2K)


def parent_candidates(header: DynamicHeader, locator_data: dict[int, bytes], *,
                      label: str) -> list[str]:
    """References to try, in order, for a differencing disk's parent.

    ``locator_data`` maps a locator's index to its data. Absolute Windows paths name a file on
    another machine; only their file name is tried, beside the child, after everything else.
    """
    primary: list[str] = []
    fallback: list[str] = []
    for platform in _PLATFORM_PREFERENCE:
        for locator in header.locators:
            if locator.platform is not platform or locator.index not in locator_data:
                continue
            decoded = locator_reference(locator, locator_data[locator.index], label)
            if decoded is None:
                continue
            path, absolute = decoded
            if absolute and platform is not Platform.MACX:
                fallback.append(posixpath.basename(path))
            else:
                primary.append(path)
    if header.parent_name:
        primary.append(header.parent_name.replace("\\", "/"))
    out: list[str] = []
    for reference in primary + fallback:
        if reference and reference not in out:
            out.append(reference)
    return out
