"""The qcow2 header and its extensions: bytes in, a validated :class:`Header` out.

Pure parsing, no I/O: the driver reads the first cluster of the image and hands it here. Every
field is checked against QEMU's limits (``block/qcow2.c: qcow2_do_open``) before anything is
sized from it, and every refusal names the field and its offset in the header.

Layout and rules: QEMU's ``docs/interop/qcow2.txt``. All numbers are big-endian.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "MAGIC",
    "Header",
    "check_table",
    "header_probe_length",
    "parse_header",
]

MAGIC = b"QFI\xfb"

# -- fixed header layout (docs/interop/qcow2.txt "Header") ----------------------------------------
_V2_FIELDS = struct.Struct(">4sIQIIQIIQQIIQ")  # bytes 0..71
_V3_FIELDS = struct.Struct(">QQQII")  # bytes 72..103
V2_HEADER_LENGTH = _V2_FIELDS.size  # 72
V3_MIN_HEADER_LENGTH = V2_HEADER_LENGTH + _V3_FIELDS.size  # 104
_COMPRESSION_TYPE_OFFSET = 104

# Byte offset of each header field, for error messages.
_FIELD_OFFSET = {
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
#: QEMU keeps the backing format in ``char backing_format[16]``.
MAX_BACKING_FORMAT_NAME = 15
MAX_REFCOUNT_ORDER = 6
_INT64_MAX = (1 << 63) - 1

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

# -- header extensions ----------------------------------------------------------------------------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_EXT_HEADER = struct.Struct(">II")
_FEATURE_ENTRY_SIZE = 48


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
    """How many bytes from the start of the file :func:`parse_header` wants: the first cluster.

    ``head`` must hold at least the fixed v2 header; an unusable cluster_bits is reported later
    by :func:`parse_header`, so this only bounds the read.
    """
    if len(head) < V2_HEADER_LENGTH:
        return V2_HEADER_LENGTH
    cluster_bits = int.from_bytes(head[20:24], "big")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        return V2_HEADER_LENGTH
    return 1 << cluster_bits


def _error(path: str, name: str, message: str) -> FormatError:
    return FormatError(message, path=path, field=name, offset=_FIELD_OFFSET.get(name))


def parse_header(data: bytes, file_size: int, path: str) -> Header:
    """Parse and validate the header in ``data`` (the image's first cluster, or all of a shorter
    file). ``file_size`` bounds the tables the header points to; ``path`` names the image in
    errors.

    Raises :class:`FormatError` for a corrupt header and :class:`UnsupportedError` for a feature
    vdiskfs refuses (encryption, the corrupt bit, unknown incompatible features).
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
        raise _error(path, "magic", f"bad magic {magic!r} (expected {MAGIC!r})")
    if version not in (2, 3):
        raise UnsupportedError(
            f"qcow2 version {version} is not supported (2 and 3 are)",
            path=path,
            field="version",
            offset=_FIELD_OFFSET["version"],
        )
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _error(
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
            raise _error(
                path,
                "header_length",
                f"header_length {header_length} is too short (version 3 needs at least "
                f"{V3_MIN_HEADER_LENGTH})",
            )
        if header_length > cluster_size:
            raise _error(
                path,
                "header_length",
                f"header_length {header_length} exceeds the cluster size {cluster_size}",
            )
        if header_length > len(data):
            raise _error(
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
            raise _error(
                path,
                "backing_file_offset",
                f"backing file name at {backing_file_offset:#x} lies outside the first "
                f"cluster ({cluster_size} bytes)",
            )
        extensions_end = backing_file_offset
    else:
        extensions_end = cluster_size
    extensions = _parse_extensions(data, header_length, extensions_end, path)

    backing_file = None
    if backing_file_offset:
        limit = min(MAX_BACKING_FILE_NAME, cluster_size - backing_file_offset)
        if backing_file_size > limit:
            raise _error(
                path,
                "backing_file_size",
                f"backing file name of {backing_file_size} bytes is too long (at most {limit})",
            )
        name_end = backing_file_offset + backing_file_size
        if name_end > len(data):
            raise _error(
                path,
                "backing_file_size",
                f"backing file name ({backing_file_size} bytes at {backing_file_offset:#x}) "
                f"reaches past the end of the file",
            )
        backing_file = os.fsdecode(bytes(data[backing_file_offset:name_end]))
        if not backing_file:
            raise _error(path, "backing_file_size", "backing file name is empty")

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
    _check_features(header, path)
    _check_geometry(header, file_size, path)
    return header


@dataclass(slots=True)
class _Extensions:
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    unknown: list[int] = field(default_factory=list)


def _parse_extensions(data: bytes, start: int, end: int, path: str) -> _Extensions:
    """Walk the extension area ``[start, end)`` as ``qcow2_read_extensions`` does."""
    found = _Extensions()
    offset = start
    # Bytes past the end of a short file read as zeros in QEMU, i.e. as the end marker.
    end = min(end, len(data))
    while offset + _EXT_HEADER.size <= end:
        magic, length = _EXT_HEADER.unpack_from(data, offset)
        body = offset + _EXT_HEADER.size
        if magic == EXT_END:
            break
        if length > end - body:
            raise FormatError(
                f"header extension {magic:#010x} of {length} bytes overruns the header area "
                f"(ends at {end:#x})",
                path=path,
                field="header extension length",
                offset=offset + 4,
            )
        payload = bytes(data[body : body + length])
        if magic == EXT_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT_NAME:
                raise FormatError(
                    f"backing format name of {length} bytes is too long "
                    f"(at most {MAX_BACKING_FORMAT_NAME})",
                    path=path,
                    field="backing format extension",
                    offset=offset,
                )
            found.backing_format = _ascii_name(payload, path, "backing format extension",
                                               body, may_be_empty=False)
        elif magic == EXT_DATA_FILE:
            found.data_file = os.fsdecode(payload)
        elif magic == EXT_FEATURE_TABLE:
            if length % _FEATURE_ENTRY_SIZE:
                raise FormatError(
                    f"feature name table of {length} bytes is not a whole number of "
                    f"{_FEATURE_ENTRY_SIZE}-byte entries",
                    path=path,
                    field="feature name table",
                    offset=offset + 4,
                )
            for entry in range(0, length, _FEATURE_ENTRY_SIZE):
                kind, bit = payload[entry], payload[entry + 1]
                name = _ascii_name(payload[entry + 2 : entry + _FEATURE_ENTRY_SIZE], path,
                                   "feature name table", body + entry + 2, may_be_empty=True)
                found.feature_names[(kind, bit)] = name
        else:
            # Bitmaps and the crypto header only matter to writers and to encrypted images
            # (refused by crypt_method); anything else is a compatible extension to skip.
            found.unknown.append(magic)
        offset = body + ((length + 7) & ~7)
    return found


def _ascii_name(raw: bytes, path: str, field: str, offset: int, *, may_be_empty: bool) -> str:
    """A name stored in a header extension: printable ASCII, as QEMU writes them.

    NUL bytes may follow the name (a feature name fills a fixed 46-byte slot; QEMU reads a
    backing format as a C string), but no text after them. Anything else -- control bytes
    (which would reach the user's terminal inside an error message), bytes above 0x7e, an empty
    name where one is needed -- is a FormatError naming the field, never a name mangled into
    something else.
    """
    text = raw.rstrip(b"\0")
    problem = None if text or may_be_empty else "is empty"
    if problem is None and not all(0x20 <= c < 0x7F for c in text):
        problem = f"{text!r} is not printable ASCII"
        if b"\0" in text:
            problem = f"{text!r} has a NUL byte inside"
    if problem is not None:
        raise FormatError(f"name {problem}", path=path, field=field, offset=offset)
    return text.decode("ascii")


def _check_features(header: Header, path: str) -> None:
    """Refuse what this reader cannot honour, as ``qcow2_do_open`` does."""
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        bits = [bit for bit in range(64) if unknown >> bit & 1]
        described = ", ".join(
            f"bit {bit} ({header.feature_names[(0, bit)]})"
            if (0, bit) in header.feature_names
            else f"bit {bit}"
            for bit in bits
        )
        raise UnsupportedError(
            f"unknown incompatible feature {described}",
            path=path,
            field="incompatible_features",
            offset=_FIELD_OFFSET["incompatible_features"],
        )
    if header.corrupt:
        raise UnsupportedError(
            "the image is marked corrupt (incompatible feature bit 1); "
            "repair it with 'qemu-img check -r all' first",
            path=path,
            field="incompatible_features",
            offset=_FIELD_OFFSET["incompatible_features"],
        )
    if header.crypt_method:
        method = CRYPT_NAMES.get(header.crypt_method, "unknown method")
        raise UnsupportedError(
            f"encrypted images are not supported (crypt_method {header.crypt_method}: {method})",
            path=path,
            field="crypt_method",
            offset=_FIELD_OFFSET["crypt_method"],
        )
    if header.refcount_order > MAX_REFCOUNT_ORDER:
        raise _error(
            path,
            "refcount_order",
            f"refcount_order {header.refcount_order} too large (refcounts are at most 64 bits)",
        )
    # Compression type and its incompatible bit must agree (qcow2.c: validate_compression_type).
    if header.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedError(
            f"unknown compression type {header.compression_type}",
            path=path,
            field="compression_type",
            offset=_FIELD_OFFSET["compression_type"],
        )
    has_bit = bool(header.incompatible_features & INCOMPAT_COMPRESSION)
    if has_bit != (header.compression_type != COMPRESSION_ZLIB):
        raise _error(
            path,
            "compression_type",
            f"compression type {header.compression_name} does not match the compression type "
            f"feature bit ({'set' if has_bit else 'clear'})",
        )
    if header.extended_l2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise _error(
            path,
            "cluster_bits",
            f"extended L2 entries need clusters of at least "
            f"{1 << MIN_EXTENDED_L2_CLUSTER_BITS} bytes (subclusters of 512), "
            f"not {header.cluster_size}",
        )
    if header.has_data_file and header.data_file is None:
        raise FormatError(
            "the image stores its data in an external data file but does not name it",
            path=path,
            field="data file extension",
        )
    if header.data_file_raw and not header.has_data_file:
        raise _error(
            path,
            "autoclear_features",
            "data-file-raw is set but the image has no external data file",
        )


def check_table(path: str, name: str, offset: int, nbytes: int, max_bytes: int,
                 cluster_size: int, file_size: int | None, what: str) -> None:
    """``qcow2_validate_table``: aligned and bounded; with ``file_size``, also inside the file
    (for the tables this reader loads)."""
    if nbytes > max_bytes:
        raise _error(path, name, f"{what} of {nbytes} bytes is too large (limit {max_bytes})")
    if offset & (cluster_size - 1):
        raise _error(path, name, f"{what} offset {offset:#x} is not cluster aligned")
    if offset > _INT64_MAX - nbytes:
        raise _error(path, name, f"{what} ({nbytes} bytes at {offset:#x}) overflows")
    if file_size is not None and offset + nbytes > file_size:
        raise _error(
            path,
            name,
            f"{what} ({nbytes} bytes at {offset:#x}) lies outside the file "
            f"(size {file_size})",
        )


def _check_geometry(header: Header, file_size: int, path: str) -> None:
    cluster_bits = header.cluster_bits
    cluster_size = header.cluster_size
    l2_bits = cluster_bits - (4 if header.extended_l2 else 3)
    # QEMU's 32 MiB L1 limit bounds the virtual size this cluster size can map.
    max_size = (QCOW_MAX_L1_SIZE // 8) << (cluster_bits + l2_bits)
    if header.size > max_size:
        raise _error(
            path,
            "size",
            f"virtual size {header.size} is larger than a qcow2 image with "
            f"{cluster_size}-byte clusters can map ({max_size})",
        )
    if header.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise _error(
            path,
            "l1_size",
            f"L1 table of {header.l1_size} entries is too large "
            f"(at most {QCOW_MAX_L1_SIZE // 8})",
        )
    l1_needed = -(-header.size >> (cluster_bits + l2_bits))
    if header.l1_size < l1_needed:
        raise _error(
            path,
            "l1_size",
            f"L1 table of {header.l1_size} entries is too small for a virtual size of "
            f"{header.size} bytes (needs {l1_needed})",
        )
    if header.l1_size:
        check_table(path, "l1_table_offset", header.l1_table_offset, header.l1_size * 8,
                     QCOW_MAX_L1_SIZE, cluster_size, file_size, "active L1 table")
    if header.refcount_table_clusters == 0:
        raise _error(path, "refcount_table_clusters", "the image has no refcount table")
    # A reader never loads the refcount table: check it as QEMU does, but do not insist that
    # it survived (a truncated image may still have readable data).
    check_table(path, "refcount_table_offset", header.refcount_table_offset,
                 header.refcount_table_clusters * cluster_size, QCOW_MAX_REFTABLE_SIZE,
                 cluster_size, None, "refcount table")
    if header.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise _error(
            path,
            "nb_snapshots",
            f"{header.nb_snapshots} snapshots is too many (at most {QCOW_MAX_SNAPSHOTS})",
        )
    if header.nb_snapshots:
        check_table(path, "snapshots_offset", header.snapshots_offset,
                     header.nb_snapshots * SNAPSHOT_HEADER_SIZE,
                     QCOW_MAX_SNAPSHOTS * SNAPSHOT_HEADER_SIZE, cluster_size, file_size,
                     "snapshot table")
