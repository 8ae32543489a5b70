"""Checks of a decoded qcow2 header as a whole, as ``qcow2_do_open`` makes them: features this
reader cannot honour are refused, and every table the header points at must be aligned, bounded
and (for the ones a reader loads) inside the file. :func:`parse_header` is the entry point:
bytes in, a validated :class:`~.header.Header` out.
"""

from __future__ import annotations

from vdiskfs.drivers.format.qcow2.header import (
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    CRYPT_NAMES,
    FIELD_OFFSET,
    INCOMPAT_COMPRESSION,
    INCOMPAT_KNOWN,
    INT64_MAX,
    MAX_REFCOUNT_ORDER,
    MIN_EXTENDED_L2_CLUSTER_BITS,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    QCOW_MAX_SNAPSHOTS,
    SNAPSHOT_HEADER_SIZE,
    Header,
    decode_header,
    field_error,
)
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["check_table", "parse_header"]


def parse_header(data: bytes, file_size: int, path: str) -> Header:
    """Parse and validate the header in ``data`` (the image's first cluster, or all of a shorter
    file). ``file_size`` bounds the tables the header points to; ``path`` names the image in
    errors.

    Raises :class:`FormatError` for a corrupt header and :class:`UnsupportedError` for a feature
    vdiskfs refuses (encryption, the corrupt bit, unknown incompatible features).
    """
    header = decode_header(data, file_size, path)
    check_features(header, path)
    check_geometry(header, file_size, path)
    return header


def check_features(header: Header, path: str) -> None:
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
            offset=FIELD_OFFSET["incompatible_features"],
        )
    if header.corrupt:
        raise UnsupportedError(
            "the image is marked corrupt (incompatible feature bit 1); "
            "repair it with 'qemu-img check -r all' first",
            path=path,
            field="incompatible_features",
            offset=FIELD_OFFSET["incompatible_features"],
        )
    if header.crypt_method:
        method = CRYPT_NAMES.get(header.crypt_method, "unknown method")
        raise UnsupportedError(
            f"encrypted images are not supported (crypt_method {header.crypt_method}: {method})",
            path=path,
            field="crypt_method",
            offset=FIELD_OFFSET["crypt_method"],
        )
    if header.refcount_order > MAX_REFCOUNT_ORDER:
        raise field_error(
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
            offset=FIELD_OFFSET["compression_type"],
        )
    has_bit = bool(header.incompatible_features & INCOMPAT_COMPRESSION)
    if has_bit != (header.compression_type != COMPRESSION_ZLIB):
        raise field_error(
            path,
            "compression_type",
            f"compression type {header.compression_name} does not match the compression type "
            f"feature bit ({'set' if has_bit else 'clear'})",
        )
    if header.extended_l2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise field_error(
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
        raise field_error(
            path,
            "autoclear_features",
            "data-file-raw is set but the image has no external data file",
        )


def check_table(path: str, name: str, offset: int, nbytes: int, max_bytes: int,
                 cluster_size: int, file_size: int | None, what: str) -> None:
    """``qcow2_validate_table``: aligned and bounded; with ``file_size``, also inside the file
    (for the tables this reader loads)."""
    if nbytes > max_bytes:
        raise field_error(path, name, f"{what} of {nbytes} bytes is too large (limit {max_bytes})")
    if offset & (cluster_size - 1):
        raise field_error(path, name, f"{what} offset {offset:#x} is not cluster aligned")
    if offset > INT64_MAX - nbytes:
        raise field_error(path, name, f"{what} ({nbytes} bytes at {offset:#x}) overflows")
    if file_size is not None and offset + nbytes > file_size:
        raise field_error(
            path,
            name,
            f"{what} ({nbytes} bytes at {offset:#x}) lies outside the file "
            f"(size {file_size})",
        )


def check_geometry(header: Header, file_size: int, path: str) -> None:
    cluster_bits = header.cluster_bits
    cluster_size = header.cluster_size
    l2_bits = cluster_bits - (4 if header.extended_l2 else 3)
    # QEMU's 32 MiB L1 limit bounds the virtual size this cluster size can map.
    max_size = (QCOW_MAX_L1_SIZE // 8) << (cluster_bits + l2_bits)
    if header.size > max_size:
        raise field_error(
            path,
            "size",
            f"virtual size {header.size} is larger than a qcow2 image with "
            f"{cluster_size}-byte clusters can map ({max_size})",
        )
    if header.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise field_error(
            path,
            "l1_size",
            f"L1 table of {header.l1_size} entries is too large "
            f"(at most {QCOW_MAX_L1_SIZE // 8})",
        )
    l1_needed = -(-header.size >> (cluster_bits + l2_bits))
    if header.l1_size < l1_needed:
        raise field_error(
            path,
            "l1_size",
            f"L1 table of {header.l1_size} entries is too small for a virtual size of "
            f"{header.size} bytes (needs {l1_needed})",
        )
    if header.l1_size:
        check_table(path, "l1_table_offset", header.l1_table_offset, header.l1_size * 8,
                     QCOW_MAX_L1_SIZE, cluster_size, file_size, "active L1 table")
    if header.refcount_table_clusters == 0:
        raise field_error(path, "refcount_table_clusters", "the image has no refcount table")
    # A reader never loads the refcount table: check it as QEMU does, but do not insist that
    # it survived (a truncated image may still have readable data).
    check_table(path, "refcount_table_offset", header.refcount_table_offset,
                 header.refcount_table_clusters * cluster_size, QCOW_MAX_REFTABLE_SIZE,
                 cluster_size, None, "refcount table")
    if header.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise field_error(
            path,
            "nb_snapshots",
            f"{header.nb_snapshots} snapshots is too many (at most {QCOW_MAX_SNAPSHOTS})",
        )
    if header.nb_snapshots:
        check_table(path, "snapshots_offset", header.snapshots_offset,
                     header.nb_snapshots * SNAPSHOT_HEADER_SIZE,
                     QCOW_MAX_SNAPSHOTS * SNAPSHOT_HEADER_SIZE, cluster_size, file_size,
                     "snapshot table")
