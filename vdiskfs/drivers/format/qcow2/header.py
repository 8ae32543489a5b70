"""The qcow2 header: its layout, QEMU's limits, feature bits, and :func:`decode_header` (bytes
in, a :class:`Header` out; :mod:`.extensions` walks the extension area, :mod:`.header_checks`
checks the whole and is the entry point, ``parse_header``).

Pure parsing, no I/O: the driver reads the first cluster of the image and hands it here. Every
field is checked against QEMU's limits (``block/qcow2.c: qcow2_do_open``) before anything is
sized from it, and every refusal names the field and its offset in the header.

Layout and rules: QEMU's ``docs/interop/qcow2.txt``. All numbers are big-endian.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from vdiskfs.drivers.format.qcow2.extensions import parse_extensions
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "FIELD_OFFSET",
    "INT64_MAX",
    "MAGIC",
    "Header",
    "decode_header",
    "field_error",
    "header_probe_length",
]

MAGIC = b"QFI\xfb"

# -- fixed header layout (docs/interop/qcow2.txt "Header") ----------------------------------------
_V2_FIELDS = struct.Struct(">4sIQIIQIIQQIIQ")  # bytes 0..71
_V3_FIELDS = struct.Struct(">QQQII")  # bytes 72..103
V2_HEADER_LENGTH = _V2_FIELDS.size  # 72
V3_MIN_HEADER_LENGTH = V2_HEADER_LENGTH + _V3_FIELDS.size  # 104
_COMPRESSION_TYPE_OFFSET = 104

#: Offsets of the header fields, for errors that name them.
FIELD_OFFSET = {
    "magic": 0,
    "version": 4,
    "backing_file_offset": 8,
    "backing_file_size": 16,
    "cluster_bits": 20,
    "size": 24,
    "crypt_method": 32,
    "l1_size": 36,
    "l1_table_offset": 40,
    "refcount_table_offset": 48,
    "refcount_table_clusters": 56,
    "nb_snapshots": 60,
    "snapshots_offset": 64,
    "incompatible_features": 72,
    "compatible_features": 80,
    "autoclear_features": 88,
    "refcount_order": 96,
    "header_length": 100,
    "compression_type": 104,
}

# -- QEMU's limits (block/qcow2.h) ----------------------------------------------------------------
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: Extended L2 entries split a cluster into 32 subclusters of at least 512 bytes.
MIN_EXTENDED_L2_CLUSTER_BITS = 14
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024
QCOW_MAX_SNAPSHOTS = 65536
#: Bytes of one snapshot table entry before its variable part.
SNAPSHOT_HEADER_SIZE = 40
MAX_BACKING_FILE_NAME = 1023
MAX_REFCOUNT_ORDER = 6
INT64_MAX = (1 << 63) - 1

# -- feature bits ---------------------------------------------------------------------------------
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

_INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

# -- compression types (header byte 104) ----------------------------------------------------------
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NAMES = {1: "AES", 2: "LUKS"}

@dataclass(frozen=True, slots=True)
class Header:
    """A validated qcow2 header with the facts drawn from its extensions."""

    version: int
    cluster_bits: int
    #: The ``size`` field as stored.
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    #: ``(type, bit) -> name`` from the feature name table extension.
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: Magic numbers of extensions this reader does not interpret (bitmaps, unknown ones).
    unknown_extensions: tuple[int, ...] = ()

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def virtual_size(self) -> int:
        """The disk size the guest sees.

        QEMU keeps sizes in 512-byte sectors (``bs->total_sectors = size / 512``), so a header
        size that is not a multiple of 512 reads as rounded down -- and so must it here, for the
        bytes to match.
        """
        return self.size & ~511

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES[self.compression_type]


def header_probe_length(head: bytes) -> int:
    """How many bytes from the start of the file :func:`.header_checks.parse_header` wants: the
    first cluster.

    ``head`` must hold at least the fixed v2 header; an unusable cluster_bits is reported later
    by :func:`decode_header`, so this only bounds the read.
    """
    if len(head) < V2_HEADER_LENGTH:
        return V2_HEADER_LENGTH
    cluster_bits = int.from_bytes(head[20:24], "big")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        return V2_HEADER_LENGTH
    return 1 << cluster_bits


def field_error(path: str, name: str, message: str) -> FormatError:
    """A :class:`FormatError` naming header field ``name`` and its offset."""
    return FormatError(message, path=path, field=name, offset=FIELD_OFFSET.get(name))


def decode_header(data: bytes, file_size: int, path: str) -> Header:
    """Decode the header in ``data`` (the image's first cluster, or all of a shorter
    file). ``file_size`` bounds the tables the header points to; ``path`` names the image in
    errors.

    Raises :class:`FormatError` for a corrupt field; :func:`.header_checks.parse_header` checks
    the whole (features, geometry) after.
    """
    if len(data) < V2_HEADER_LENGTH:
        raise FormatError(
            f"file too short for a qcow2 header ({len(data)} bytes, need {V2_HEADER_LENGTH})",
            path=path,
            field="header",
            offset=0,
        )
    (
        magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2_FIELDS.unpack_from(data)
    if magic != MAGIC:
        raise field_error(path, "magic", f"bad magic {magic!r} (expected {MAGIC!r})")
    if version not in (2, 3):
        raise UnsupportedError(
            f"qcow2 version {version} is not supported (2 and 3 are)",
            path=path,
            field="version",
            offset=FIELD_OFFSET["version"],
        )
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise field_error(
            path,
            "cluster_bits",
            f"cluster_bits {cluster_bits} out of range "
            f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}: 512 B to 2 MiB clusters)",
        )
    cluster_size = 1 << cluster_bits

    if version == 2:
        incompatible = compatible = autoclear = 0
        refcount_order = 4
        header_length = V2_HEADER_LENGTH
    else:
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise FormatError(
                f"file too short for a version 3 header ({len(data)} bytes)",
                path=path,
                field="header",
                offset=0,
            )
        incompatible, compatible, autoclear, refcount_order, header_length = (
            _V3_FIELDS.unpack_from(data, V2_HEADER_LENGTH)
        )
        if header_length < V3_MIN_HEADER_LENGTH:
            raise field_error(
                path,
                "header_length",
                f"header_length {header_length} is too short (version 3 needs at least "
                f"{V3_MIN_HEADER_LENGTH})",
            )
        if header_length > cluster_size:
            raise field_error(
                path,
                "header_length",
                f"header_length {header_length} exceeds the cluster size {cluster_size}",
            )
        if header_length > len(data):
            raise field_error(
                path,
                "header_length",
                f"header_length {header_length} reaches past the end of the file "
                f"({len(data)} bytes)",
            )
    compression_type = (
        data[_COMPRESSION_TYPE_OFFSET] if header_length > _COMPRESSION_TYPE_OFFSET else 0
    )

    # Header extensions fill the rest of the first cluster, up to the backing file name.
    if backing_file_offset:
        if backing_file_offset > cluster_size:
            raise field_error(
                path,
                "backing_file_offset",
                f"backing file name at {backing_file_offset:#x} lies outside the first "
                f"cluster ({cluster_size} bytes)",
            )
        extensions_end = backing_file_offset
    else:
        extensions_end = cluster_size
    extensions = parse_extensions(data, header_length, extensions_end, path)

    backing_file = None
    if backing_file_offset:
        limit = min(MAX_BACKING_FILE_NAME, cluster_size - backing_file_offset)
        if backing_file_size > limit:
            raise field_error(
                path,
                "backing_file_size",
                f"backing file name of {backing_file_size} bytes is too long (at most {limit})",
            )
        name_end = backing_file_offset + backing_file_size
        if name_end > len(data):
            raise field_error(
                path,
                "backing_file_size",
                f"backing file name ({backing_file_size} bytes at {backing_file_offset:#x}) "
                f"reaches past the end of the file",
            )
        backing_file = os.fsdecode(bytes(data[backing_file_offset:name_end]))
        if not backing_file:
            raise field_error(path, "backing_file_size", "backing file name is empty")

    header = Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompatible,
        compatible_features=compatible,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        backing_file=backing_file,
        backing_format=extensions.backing_format,
        data_file=extensions.data_file,
        feature_names=extensions.feature_names,
        unknown_extensions=tuple(extensions.unknown),
    )
    return header
