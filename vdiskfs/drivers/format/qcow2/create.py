"""Creating an empty qcow2 image, as ``qemu-img create -f qcow2`` does (QEMU's
``qcow2_co_create``).

The layout is QEMU's for a fresh image, computed at once rather than grown: the header cluster
(header, extensions, backing file name), the refcount table, the refcount blocks, the L1 table;
with ``preallocation`` other than ``off`` also every L2 table and data cluster, all mapped. Each
of those clusters has refcount 1, and nothing else exists, so ``qemu-img check`` finds the image
clean and ``qemu-img info`` reports exactly the options given.

This module alone in the driver touches the host's files directly: it makes a new file, before
there is a node tree to write through. The file must not exist; on failure nothing is left.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import trio

from vdiskfs.block.registry import PROBE_HEAD, PROBE_TAIL, probe
from vdiskfs.drivers.format.qcow2.extensions import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    MAX_BACKING_FORMAT_NAME,
)
from vdiskfs.drivers.format.qcow2.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    MAGIC,
    MAX_BACKING_FILE_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_EXTENDED_L2_CLUSTER_BITS,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
)
from vdiskfs.drivers.format.qcow2.mapping import OFLAG_COPIED
from vdiskfs.drivers.format.qcow2.refcount_codec import RefcountCodec
from vdiskfs.errors import HostIOError, UnsupportedError, VdiskError

__all__ = ["PREALLOCATION_MODES", "create_qcow2"]

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_COMPRESSION = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}
#: QEMU writes version 3 headers of 112 bytes: the fields, the compression type, padding.
_V3_HEADER_LENGTH = 112
_V2_HEADER_LENGTH = 72
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
#: The feature name table QEMU writes (type, bit, name): what a reader that does not know a
#: feature bit can print.
_FEATURES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
_ZERO_CHUNK = 1 << 20


def _invalid(message: str, path: str) -> VdiskError:
    return VdiskError(message, path=path, errno=errno.EINVAL)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Cluster indices of everything a new image holds, in file order."""

    cluster_bits: int
    l1_size: int
    reftable: int
    reftable_clusters: int
    blocks: int
    block_count: int
    l1: int
    l1_clusters: int
    l2: int
    l2_count: int
    data: int
    data_count: int
    #: Guest clusters of the virtual disk (what a preallocated image maps).
    guest_clusters: int

    @property
    def clusters(self) -> int:
        """Clusters counted (everything but a data file's clusters)."""
        return self.data + self.data_count


def _layout(size: int, cluster_bits: int, extended_l2: bool, refcount_order: int,
            preallocate: bool, data_in_image: bool) -> _Layout:
    cluster_size = 1 << cluster_bits
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l1_size = -(-size // (cluster_size * l2_entries))
    l1_clusters = max(1, -(-l1_size * 8 // cluster_size))
    l2_count = l1_size if preallocate else 0
    guest_clusters = -(-size >> cluster_bits)
    data_count = guest_clusters if preallocate and data_in_image else 0
    codec = RefcountCodec(refcount_order, cluster_bits)
    table_clusters = blocks = 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters + l2_count + data_count
        need_blocks = -(-total // codec.entries_per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    reftable = 1
    first_block = reftable + table_clusters
    l1 = first_block + blocks
    l2 = l1 + l1_clusters
    data = l2 + l2_count
    return _Layout(cluster_bits, l1_size, reftable, table_clusters, first_block, blocks, l1,
                   l1_clusters, l2, l2_count, data, data_count, guest_clusters)


def _extension(magic: int, payload: bytes) -> bytes:
    padded = payload + bytes(-len(payload) % 8)
    return struct.pack(">II", magic, len(payload)) + padded


def _header_cluster(*, path: str, version: int, cluster_size: int, size: int, layout: _Layout,
                    refcount_order: int, incompatible: int, compatible: int, autoclear: int,
                    compression: int, backing_file: str | None, backing_format: str | None,
                    data_file: str | None) -> bytes:
    extensions = b""
    if backing_format is not None:
        extensions += _extension(EXT_BACKING_FORMAT, backing_format.encode("ascii"))
    if data_file is not None:
        extensions += _extension(EXT_DATA_FILE, os.fsencode(data_file))
    header_length = _V3_HEADER_LENGTH if version >= 3 else _V2_HEADER_LENGTH
    backing = os.fsencode(backing_file) if backing_file is not None else b""
    end_marker = bytes(8)
    if version >= 3:
        table = b"".join(struct.pack(">BB46s", kind, bit, name.encode("ascii"))
                         for kind, bit, name in _FEATURES)
        feature_table = _extension(EXT_FEATURE_TABLE, table)
        # Optional: QEMU leaves it out where it does not fit (512-byte clusters).
        if header_length + len(extensions) + len(feature_table) + 8 + len(backing) <= (
                cluster_size):
            extensions += feature_table
    backing_offset = header_length + len(extensions) + len(end_marker) if backing else 0
    if header_length + len(extensions) + len(end_marker) + len(backing) > cluster_size:
        raise _invalid(f"the header, its extensions and the backing file name do not fit in "
                       f"one cluster of {cluster_size} bytes", path)
    fixed = _HEADER.pack(
        MAGIC, version, backing_offset, len(backing), layout.cluster_bits, size, 0,
        layout.l1_size, layout.l1 << layout.cluster_bits,
        layout.reftable << layout.cluster_bits, layout.reftable_clusters, 0, 0,
    )
    if version >= 3:
        fixed += _HEADER_V3.pack(incompatible, compatible, autoclear, refcount_order,
                                 header_length)
        fixed += bytes([compression]) + bytes(_V3_HEADER_LENGTH - len(fixed) - 1)
    out = bytearray(cluster_size)
    content = fixed + extensions + end_marker + backing
    out[: len(content)] = content
    return bytes(out)


async def create_qcow2(
    path: str,
    size: int,
    *,
    cluster_size: int = 65536,
    compat: str = "1.1",
    refcount_bits: int = 16,
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
    compression_type: str = "zlib",
    backing_file: str | None = None,
    backing_format: str | None = None,
    data_file: str | None = None,
    data_file_raw: bool = False,
    preallocation: str = "off",
) -> None:
    """Create the qcow2 image ``path`` of ``size`` bytes (rounded up to 512, as QEMU).

    Options as ``qemu-img create -o``: ``compat`` ``0.10``/``1.1`` (``v2``/``v3``),
    ``refcount_bits`` 1..64, ``extended_l2`` (clusters of 16 KiB or more), ``lazy_refcounts``,
    ``compression_type`` ``zlib``/``zstd``, ``backing_file`` (stored as given, resolved
    relative to the image's directory) and its ``backing_format`` (probed when not given),
    ``data_file`` (created, of the virtual size) with ``data_file_raw``, and ``preallocation``
    ``off``/``metadata``/``falloc``/``full``. Combinations QEMU refuses are refused the same
    way; ``data_file_raw`` implies metadata preallocation, as in QEMU.
    """
    version = _COMPAT.get(compat)
    if version is None:
        raise _invalid(f"compat={compat!r} (valid: 0.10, 1.1, v2, v3)", path)
    if size < 0:
        raise _invalid(f"size {size} is negative", path)
    size = -(-size // 512) * 512
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= (
            MAX_CLUSTER_BITS):
        raise _invalid(f"cluster_size {cluster_size}: must be a power of two between 512 "
                       "and 2 MiB", path)
    refcount_order = refcount_bits.bit_length() - 1
    if refcount_bits != 1 << refcount_order or refcount_order > 6:
        raise _invalid(f"refcount_bits {refcount_bits}: must be a power of two up to 64", path)
    compression = _COMPRESSION.get(compression_type)
    if compression is None:
        raise _invalid(f"compression_type={compression_type!r} (valid: zlib, zstd)", path)
    if preallocation not in PREALLOCATION_MODES:
        raise _invalid(f"preallocation={preallocation!r} (valid: "
                       f"{', '.join(PREALLOCATION_MODES)})", path)
    if version < 3:
        for enabled, what in (
            (refcount_bits != 16, "refcount widths other than 16 bits"),
            (lazy_refcounts, "lazy refcounts"),
            (extended_l2, "extended L2 entries"),
            (compression != COMPRESSION_ZLIB, "compression types other than zlib"),
            (data_file is not None, "an external data file"),
        ):
            if enabled:
                raise UnsupportedError(f"{what} need compat=1.1 (version 3)", path=path)
    if extended_l2 and cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise UnsupportedError("extended L2 entries need clusters of at least "
                               f"{1 << MIN_EXTENDED_L2_CLUSTER_BITS} bytes", path=path)
    if data_file_raw and data_file is None:
        raise _invalid("data_file_raw needs a data_file", path)
    if backing_format is not None and backing_file is None:
        raise _invalid("backing_format without a backing_file", path)
    if backing_file is not None:
        if data_file_raw:
            raise UnsupportedError("a backing file and data_file_raw cannot be used together",
                                   path=path)
        if preallocation != "off" and not extended_l2:
            raise UnsupportedError("a backing file and preallocation can only be used "
                                   "together with extended_l2 (preallocated clusters would "
                                   "hide the backing file)", path=path)
        if not backing_file or len(os.fsencode(backing_file)) > MAX_BACKING_FILE_NAME:
            raise _invalid(f"backing file name of {len(os.fsencode(backing_file))} bytes "
                           f"(1 to {MAX_BACKING_FILE_NAME})", path)
        if backing_format is None:
            backing_format = await _probe_backing(path, backing_file)
        if len(backing_format) > MAX_BACKING_FORMAT_NAME or not backing_format.isascii():
            raise _invalid(f"backing format {backing_format!r}", path)
    if data_file_raw and preallocation == "off":
        # Every cluster mapped, so that the data file alone is the disk (QEMU does the same).
        preallocation = "metadata"
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    if -(-size // (cluster_size * l2_entries)) > QCOW_MAX_L1_SIZE // 8:
        raise _invalid(f"size {size} is too large for {cluster_size}-byte clusters", path)
    layout = _layout(size, cluster_bits, extended_l2, refcount_order, preallocation != "off",
                     data_file is None)
    if layout.reftable_clusters << cluster_bits > QCOW_MAX_REFTABLE_SIZE:
        raise _invalid("the image would need a refcount table larger than QEMU allows; "
                       "use larger clusters or refcounts", path)

    incompatible = (
        (INCOMPAT_DATA_FILE if data_file is not None else 0)
        | (INCOMPAT_COMPRESSION if compression != COMPRESSION_ZLIB else 0)
        | (INCOMPAT_EXTL2 if extended_l2 else 0)
    )
    header = _header_cluster(
        path=path, version=version, cluster_size=cluster_size, size=size, layout=layout,
        refcount_order=refcount_order, incompatible=incompatible,
        compatible=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        autoclear=AUTOCLEAR_DATA_FILE_RAW if data_file_raw else 0, compression=compression,
        backing_file=backing_file, backing_format=backing_format, data_file=data_file,
    )
    data_path = None
    if data_file is not None:
        data_path = os.path.join(os.path.dirname(os.path.abspath(path)), data_file)
    await trio.to_thread.run_sync(
        _write_image, path, data_path, header, layout, size, refcount_order, extended_l2,
        preallocation,
    )


async def _probe_backing(path: str, backing_file: str) -> str:
    """The backing file's format, probed as a reader would (so that it can be recorded)."""
    resolved = os.path.join(os.path.dirname(os.path.abspath(path)), backing_file)
    try:
        with open(resolved, "rb") as f:
            head = f.read(PROBE_HEAD)
            f.seek(max(0, os.fstat(f.fileno()).st_size - PROBE_TAIL))
            tail = f.read(PROBE_TAIL)
    except OSError as exc:
        raise HostIOError.wrap(exc, resolved, "cannot open the backing file") from exc
    driver, _score = probe(head, tail, resolved)
    return driver.driver


def _create_exclusive(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostIOError.wrap(exc, path, "cannot create") from exc


def _write_image(path: str, data_path: str | None, header: bytes, layout: _Layout, size: int,
                 refcount_order: int, extended_l2: bool, preallocation: str) -> None:
    created: list[tuple[str, int]] = []
    current = path
    try:
        fd = _create_exclusive(path)
        created.append((path, fd))
        if data_path is not None:
            data_fd = _create_exclusive(data_path)
            created.append((data_path, data_fd))
        _write_metadata(fd, header, layout, refcount_order, extended_l2)
        if data_path is not None:
            current = data_path
            _fill(data_fd, 0, size, preallocation)
            os.fsync(data_fd)
            current = path
        elif layout.data_count:
            _fill(fd, layout.data << layout.cluster_bits, layout.data_count << layout.cluster_bits,
                  preallocation)
        os.fsync(fd)
    except BaseException as exc:
        for name, descriptor in created:
            os.close(descriptor)
            os.unlink(name)
        if isinstance(exc, OSError):
            raise HostIOError.wrap(exc, current, "cannot create") from exc
        raise
    for _name, descriptor in created:
        os.close(descriptor)


def _write_metadata(fd: int, header: bytes, layout: _Layout, refcount_order: int,
                    extended_l2: bool) -> None:
    cluster_bits = layout.cluster_bits
    cluster_size = 1 << cluster_bits
    os.pwrite(fd, header, 0)
    # Refcount table and blocks: every cluster of the layout counted once.
    table = bytearray(layout.reftable_clusters << cluster_bits)
    codec = RefcountCodec(refcount_order, cluster_bits)
    remaining = layout.clusters
    for index in range(layout.block_count):
        block_offset = (layout.blocks + index) << cluster_bits
        struct.pack_into(">Q", table, 8 * index, block_offset)
        ones = min(codec.entries_per_block, max(0, remaining))
        os.pwrite(fd, bytes(codec.encode_block([1] * ones)), block_offset)
        remaining -= ones
    os.pwrite(fd, bytes(table), layout.reftable << cluster_bits)
    # L1 (and, preallocated, the L2 tables mapping every cluster).
    l1 = bytearray(layout.l1_size * 8)
    entry_size = 16 if extended_l2 else 8
    l2_entries = cluster_size // entry_size
    data_in_image = layout.data_count > 0
    for index in range(layout.l2_count):
        l2_offset = (layout.l2 + index) << cluster_bits
        struct.pack_into(">Q", l1, 8 * index, l2_offset | OFLAG_COPIED)
        table_bytes = bytearray(cluster_size)
        first = index * l2_entries
        for i in range(l2_entries):
            guest_cluster = first + i
            if guest_cluster >= layout.guest_clusters:
                break
            host = ((layout.data + guest_cluster) if data_in_image else guest_cluster) \
                << cluster_bits
            # Extended L2: no subcluster marked allocated, as QEMU's preallocation leaves them
            # (a backing file still shows through).
            struct.pack_into(">Q", table_bytes, i * entry_size, host | OFLAG_COPIED)
        os.pwrite(fd, bytes(table_bytes), l2_offset)
    if layout.l1_size:
        os.pwrite(fd, bytes(l1), layout.l1 << cluster_bits)
    end = layout.clusters << cluster_bits if layout.l2_count else (
        (layout.l1 << cluster_bits) + max(8, layout.l1_size * 8))
    if os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)


def _fill(fd: int, offset: int, length: int, preallocation: str) -> None:
    """The data region: sparse, allocated, or written with zeros."""
    if preallocation == "falloc" and length:
        os.posix_fallocate(fd, offset, length)
    elif preallocation == "full":
        zeros = bytes(min(_ZERO_CHUNK, length))
        done = 0
        while done < length:
            done += os.pwrite(fd, zeros[: min(len(zeros), length - done)], offset + done)
    if os.fstat(fd).st_size < offset + length:
        os.ftruncate(fd, offset + length)
