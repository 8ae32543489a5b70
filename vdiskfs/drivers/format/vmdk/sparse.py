"""Structures of a hosted sparse extent (magic ``KDMV``): header, stream footer, markers.

Layout, from VMware's "Virtual Disk Format 5.0" and QEMU's ``block/vmdk.c``::

    sector 0          SparseExtentHeader (little endian)
    descriptorOffset  embedded text descriptor (monolithicSparse, streamOptimized)
    rgdOffset         redundant grain directory and its grain tables (kept in step by writes)
    gdOffset          grain directory: one u32 per grain table, the table's sector
    ...               grain tables: numGTEsPerGT u32 entries, each a grain's sector
    grainOffset       grains

A grain table entry is 0 for an unallocated grain and 1 for a zeroed grain when the header
sets the zeroed-grain flag. A ``streamOptimized`` extent compresses each grain with deflate and
prefixes it with a marker ``{u64 lba, u32 size}``; when ``gdOffset`` is ``GD_AT_END`` the
header at sector 0 is only a promise, and the real one is the footer 1536 bytes before the end.

Functions here parse bytes and check bounds; none reads a file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "COWD_MAGIC",
    "GD_AT_END",
    "GRAIN_MARKER",
    "MAX_COMPRESSED_GRAIN",
    "MAX_GD_ENTRIES",
    "MAX_GRAIN_SECTORS",
    "MAX_GTES_PER_GT",
    "SECTOR",
    "SPARSE_MAGIC",
    "STREAM_FOOTER_SIZE",
    "SparseHeader",
    "check_header",
    "parse_sparse_header",
    "parse_stream_footer",
]

SECTOR = 512
SPARSE_MAGIC = b"KDMV"
#: VMDK3 / ESX "COW disk" sparse extents, which vdiskfs refuses.
COWD_MAGIC = b"COWD"

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

# Bounds on header fields, before anything is allocated from them.
#: QEMU: "0x200000 * 512Bytes = 1GB for one cluster is unrealistic".
MAX_GRAIN_SECTORS = 0x200000
#: QEMU refuses larger grain tables ("L2 table size too big"); VMware always writes 512.
MAX_GTES_PER_GT = 512
#: QEMU's bound on the grain directory ("L1 size too big"): 128 MiB of u32.
MAX_GD_ENTRIES = 32 * 1024 * 1024
#: A compressed grain is decompressed whole into memory: refuse grains larger than this.
MAX_COMPRESSED_GRAIN = 16 << 20
MAX_VERSION = 3

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize, numGTEsPerGT,
# rgdOffset, gdOffset, overHead, uncleanShutdown, 4 newline-check bytes, compressAlgorithm.
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
#: A grain marker: lba (u64), size of the compressed data (u32); the data follows.
GRAIN_MARKER = struct.Struct("<QI")
#: A metadata marker: number of sectors (u64), size (u32, always 0), type (u32).
_META_MARKER = struct.Struct("<QII")
#: Footer marker, footer header, end-of-stream marker: one sector each.
STREAM_FOOTER_SIZE = 3 * SECTOR


@dataclass(frozen=True, slots=True)
class SparseHeader:
    """A checked ``SparseExtentHeader``; offsets and sizes in sectors, as stored."""

    version: int
    flags: int
    capacity: int
    grain_sectors: int
    desc_offset: int
    desc_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    compression: int

    @property
    def compressed(self) -> bool:
        return self.compression == COMPRESSION_DEFLATE

    @property
    def has_markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def zero_grain(self) -> bool:
        return bool(self.flags & FLAG_ZERO_GRAIN)

    @property
    def has_redundant_gd(self) -> bool:
        """Whether writes must keep a redundant grain directory and tables up to date (QEMU
        uses ``rgdOffset`` only when the flag says it is valid)."""
        return bool(self.flags & FLAG_RGD) and self.rgd_offset != 0

    @property
    def gt_bytes(self) -> int:
        """Bytes a grain table occupies in the file (whole sectors)."""
        return -(-self.gtes_per_gt * 4 // SECTOR) * SECTOR

    @property
    def gd_at_end(self) -> bool:
        return self.gd_offset == GD_AT_END

    @property
    def grain_size(self) -> int:
        return self.grain_sectors * SECTOR

    @property
    def gt_coverage(self) -> int:
        """Guest bytes mapped by one grain table."""
        return self.gtes_per_gt * self.grain_size

    @property
    def gd_entries(self) -> int:
        coverage = self.gtes_per_gt * self.grain_sectors
        return -(-self.capacity // coverage)


def _unpack(sector: bytes, label: str, what: str) -> SparseHeader:
    if len(sector) < _HEADER.size:
        raise FormatError(f"{what} is truncated ({len(sector)} bytes)", path=label, field=what)
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead,
     _unclean, _nl_check, compression) = _HEADER.unpack_from(sector)
    if magic != SPARSE_MAGIC:
        if magic == COWD_MAGIC:
            raise UnsupportedError("VMDK3 (COWD) sparse extents are not supported",
                                   path=label, field="magic")
        raise FormatError(f"bad magic {magic!r} (expected {SPARSE_MAGIC!r})", path=label,
                          field="magic", offset=0)
    return SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd,
                        overhead, compression)


def parse_sparse_header(sector: bytes, label: str) -> SparseHeader:
    """Unpack the header at sector 0 (not yet checked: the stream footer may replace it)."""
    return _unpack(sector, label, "header")


def parse_stream_footer(tail: bytes, label: str) -> SparseHeader:
    """Unpack the footer of a ``streamOptimized`` extent: the last :data:`STREAM_FOOTER_SIZE`
    bytes, a footer marker, the footer header and the end-of-stream marker."""
    if len(tail) != STREAM_FOOTER_SIZE:
        raise FormatError("file too small for a stream-optimized footer", path=label,
                          field="footer")
    _, size, kind = _META_MARKER.unpack_from(tail, 0)
    eos_val, eos_size, eos_kind = _META_MARKER.unpack_from(tail, 2 * SECTOR)
    if size != 0 or kind != MARKER_FOOTER or (eos_val, eos_size, eos_kind) != (0, 0, MARKER_EOS):
        raise FormatError("invalid stream-optimized footer (footer or end-of-stream marker "
                          "missing)", path=label, field="footer")
    return _unpack(tail[SECTOR : 2 * SECTOR], label, "footer")


def check_header(header: SparseHeader, file_size: int, label: str) -> None:
    """Bound every field that sizes an allocation or a loop, against QEMU's limits and the
    file's size; the grain directory must lie inside the file."""
    if header.version > MAX_VERSION:
        raise UnsupportedError(f"VMDK sparse version {header.version}", path=label,
                               field="version")
    if header.compression not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        raise UnsupportedError(f"compression algorithm {header.compression}", path=label,
                               field="compressAlgorithm")
    if not 0 < header.gtes_per_gt <= MAX_GTES_PER_GT:
        raise FormatError(f"{header.gtes_per_gt} entries per grain table (1 to "
                          f"{MAX_GTES_PER_GT} allowed)", path=label, field="numGTEsPerGT")
    if not 0 < header.grain_sectors <= MAX_GRAIN_SECTORS:
        raise FormatError(f"grain size of {header.grain_sectors} sectors (1 to "
                          f"{MAX_GRAIN_SECTORS} allowed)", path=label, field="grainSize")
    if header.compressed and header.grain_size > MAX_COMPRESSED_GRAIN:
        raise UnsupportedError(f"compressed grains of {header.grain_size} bytes (at most "
                               f"{MAX_COMPRESSED_GRAIN})", path=label, field="grainSize")
    if header.gd_entries > MAX_GD_ENTRIES:
        raise FormatError(f"capacity of {header.capacity} sectors needs {header.gd_entries} "
                          f"grain tables (at most {MAX_GD_ENTRIES})", path=label,
                          field="capacity")
    if header.grain_offset * SECTOR > file_size:
        raise FormatError(f"file truncated: grains start at {header.grain_offset * SECTOR} "
                          f"but the file has {file_size} bytes", path=label, field="overHead")
    if header.gd_at_end:
        raise FormatError("grain directory location still unknown (GD_AT_END)", path=label,
                          field="gdOffset")
    gd_bytes = header.gd_entries * 4
    gd_start = header.gd_offset * SECTOR
    if gd_start + gd_bytes > file_size:
        raise FormatError(f"grain directory ({gd_bytes} bytes at {gd_start:#x}) lies outside "
                          f"the file ({file_size} bytes)", path=label, field="gdOffset",
                          offset=gd_start)
