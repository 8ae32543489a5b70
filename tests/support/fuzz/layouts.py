"""What a mutator knows about each format: where the fields, tables, names and checksums are.

:func:`describe` reads a (valid) image file and returns its :class:`Layout`: the header fields
with their kind (an offset, a size, a count, flags...), the metadata tables (qcow2 L1/L2 and
refcount tables, QED L1/L2, VDI block map, VMDK grain directory and tables, VHD BAT, VHDX BAT,
partition entries), where names of other files are stored, and how to re-seal the checksums
after a change. Parsing is best-effort and bounded: a layout is a map for the mutator, not a
driver, and what it cannot find it leaves out.

Offsets and sizes follow the specifications the drivers cite: QEMU's docs/interop/qcow2.txt and
qed_spec.txt, VirtualBox's VDI header, VMware's "Virtual Disk Format 5.0", Microsoft's VHD and
MS-VHDX specifications, UEFI 2.x for GPT.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support import vhdx_build as vb
from vdiskfs.drivers.format.vhdx.crc32c import crc32c_zeroed

__all__ = ["Field", "Layout", "Reference", "Table", "describe", "sniff"]

KiB = 1024
MiB = 1024 * KiB
#: Longest table a layout lists entries of (a mutation picks a few entries anyway).
MAX_TABLE_ENTRIES = 1 << 16
MAX_TABLES = 64

#: Field kinds: what boundary values make sense for it.
OFFSET, SIZE, COUNT, FLAGS, ENUM, INT = "offset", "size", "count", "flags", "enum", "int"


@dataclass(frozen=True)
class Field:
    """An integer ``struct`` field at ``offset`` of the file; ``unit``: bytes per unit of an
    offset or size stored in sectors, clusters..."""

    name: str
    offset: int
    fmt: str
    kind: str
    unit: int = 1
    #: How often the mutator picks it, relative to others: fields that lead to other files
    #: (name offsets and lengths, locators) are picked more, their code is the least trodden.
    weight: float = 1.0


@dataclass(frozen=True)
class Table:
    """A table of ``count`` entries ``fmt`` at ``offset`` that point into the file.

    ``encode(byte_offset) -> entry`` makes an entry that points at a byte offset (flags and
    units as the format stores them); ``specials`` are entry values with a meaning of their own
    (free, zero, unallocated).
    """

    name: str
    offset: int
    fmt: str
    count: int
    encode: Callable[[int], int]
    specials: tuple[int, ...] = ()


@dataclass(frozen=True)
class Reference:
    """A name of another file stored in the image: ``rewrite(data, name)`` returns the file
    with ``name`` (bytes, already encoded as the format would) stored in place of the old one.
    """

    name: str
    rewrite: Callable[[bytearray, bytes], bytearray]


@dataclass
class Layout:
    format: str
    fields: list[Field] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    #: Recompute the checksums that would make a reader stop at the first check.
    seal: Callable[[bytearray], None] | None = None
    #: Offsets of structures (headers, tables) a pointer can be aimed at to overlap them.
    structures: list[int] = field(default_factory=list)
    #: Allocation unit (cluster, block, sector) for aligned but wrong offsets.
    unit: int = 512


def _u(data: bytes | bytearray, offset: int, fmt: str) -> int:
    if offset < 0 or offset + struct.calcsize(fmt) > len(data):
        return 0
    return int(struct.unpack_from(fmt, data, offset)[0])


def sniff(data: bytes | bytearray) -> str:
    """The format of a file's bytes, by magic; ``raw`` when none matches."""
    head = bytes(data[:8])
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] == b"QED\0":
        return "qed"
    if head[:4] == b"KDMV" or head.startswith(b"# Disk D"):
        return "vmdk"
    if _u(data, 64, "<I") == 0xBEDA107F:
        return "vdi"
    if head == b"vhdxfile":
        return "vhdx"
    if head == b"conectix" or bytes(data[-512:-504]) == b"conectix":
        return "vpc"
    return "raw"


def describe(data: bytes | bytearray) -> Layout:
    """The layout of an image file's bytes (see the module docstring)."""
    fmt = sniff(data)
    try:
        return _DESCRIBERS[fmt](bytes(data))
    except (struct.error, ValueError, KeyError, IndexError, OverflowError):
        return Layout(fmt)


# -- qcow2 -----------------------------------------------------------------------------------------

_QCOW2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
_QCOW2_COPIED = 1 << 63
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441


def _qcow2(data: bytes) -> Layout:
    version = _u(data, 4, ">I")
    cluster_bits = _u(data, 20, ">I")
    cluster = 1 << cluster_bits if 9 <= cluster_bits <= 21 else 65536
    layout = Layout("qcow2", unit=cluster)
    layout.fields += [
        Field("version", 4, ">I", ENUM), Field("backing_file_offset", 8, ">Q", OFFSET, weight=3),
        Field("backing_file_size", 16, ">I", SIZE, weight=3), Field("cluster_bits", 20, ">I", INT),
        Field("size", 24, ">Q", SIZE), Field("crypt_method", 32, ">I", ENUM),
        Field("l1_size", 36, ">I", COUNT), Field("l1_table_offset", 40, ">Q", OFFSET),
        Field("refcount_table_offset", 48, ">Q", OFFSET),
        Field("refcount_table_clusters", 56, ">I", COUNT),
        Field("nb_snapshots", 60, ">I", COUNT), Field("snapshots_offset", 64, ">Q", OFFSET),
    ]
    header_length = 72
    if version >= 3:
        header_length = _u(data, 100, ">I")
        layout.fields += [
            Field("incompatible_features", 72, ">Q", FLAGS),
            Field("compatible_features", 80, ">Q", FLAGS),
            Field("autoclear_features", 88, ">Q", FLAGS), Field("refcount_order", 96, ">I", INT),
            Field("header_length", 100, ">I", SIZE),
        ]
        if header_length > 104:
            layout.fields.append(Field("compression_type", 104, ">B", ENUM))
    # Header extensions.
    at, extensions = header_length, []
    while at + 8 <= min(len(data), cluster) and len(extensions) < 32:
        kind, length = struct.unpack_from(">II", data, at)
        if kind == 0:
            break
        extensions.append((kind, at, length))
        layout.fields += [Field(f"extension[{kind:#x}].type", at, ">I", ENUM),
                          Field(f"extension[{kind:#x}].length", at + 4, ">I", SIZE)]
        at += 8 + length + (-length % 8)
    ext_end = at

    def entry(offset: int) -> int:
        return (offset & ((1 << 62) - 1)) | _QCOW2_COPIED

    l1_offset, l1_size = _u(data, 40, ">Q"), _u(data, 36, ">I")
    layout.structures += [0, l1_offset, _u(data, 48, ">Q"), _u(data, 64, ">Q")]
    l1 = Table("L1", l1_offset, ">Q", min(l1_size, MAX_TABLE_ENTRIES), entry, (0,))
    layout.tables.append(l1)
    for l2_offset in _entries(data, l1, _QCOW2_OFFSET_MASK)[:MAX_TABLES]:
        # Extended L2 entries are 16 bytes: their halves are listed as 8-byte entries.
        layout.tables.append(Table("L2", l2_offset, ">Q", cluster // 8, entry,
                                   (0, 1, 1 << 62, (1 << 62) | 1)))
        layout.structures.append(l2_offset)
    rt = Table("refcount table", _u(data, 48, ">Q"), ">Q",
               min(_u(data, 56, ">I") * cluster // 8, MAX_TABLE_ENTRIES), lambda o: o, (0,))
    layout.tables.append(rt)
    order = _u(data, 96, ">I") if version >= 3 else 4
    block_fmt = {3: ">B", 4: ">H", 5: ">I", 6: ">Q"}.get(order, ">B")
    for block in _entries(data, rt, _QCOW2_OFFSET_MASK)[:MAX_TABLES]:
        layout.tables.append(Table("refcount block", block, block_fmt,
                                   cluster // struct.calcsize(block_fmt), lambda o: o & 0xFF,
                                   (0, 1, 2)))
    _qcow2_snapshots(data, layout, cluster)
    backing_at, backing_len = _u(data, 8, ">Q"), _u(data, 16, ">I")

    def rewrite_backing(buf: bytearray, name: bytes) -> bytearray:
        at = backing_at if backing_at else ext_end + 8
        _write(buf, at, name)
        struct.pack_into(">QI", buf, 8, at, len(name))
        return buf

    if backing_at or backing_len:
        layout.references.append(Reference("backing_file", rewrite_backing))
    for kind, at, length in extensions:
        if kind in (_EXT_BACKING_FORMAT, _EXT_DATA_FILE):
            label = "backing format" if kind == _EXT_BACKING_FORMAT else "data_file"
            layout.references.append(Reference(label, _qcow2_ext_rewriter(at, length)))
    return layout


def _qcow2_ext_rewriter(at: int, old_length: int) -> Callable[[bytearray, bytes], bytearray]:
    def rewrite(buf: bytearray, name: bytes) -> bytearray:
        # Same room as before: a longer name spills over the next extension (hostile too).
        struct.pack_into(">I", buf, at + 4, len(name))
        _write(buf, at + 8, name)
        return buf
    return rewrite


def _qcow2_snapshots(data: bytes, layout: Layout, cluster: int) -> None:
    at, count = _u(data, 64, ">Q"), _u(data, 60, ">I")
    for i in range(min(count, 8)):
        if at + 40 > len(data):
            return
        prefix = f"snapshot[{i}]"
        layout.fields += [
            Field(f"{prefix}.l1_table_offset", at, ">Q", OFFSET),
            Field(f"{prefix}.l1_size", at + 8, ">I", COUNT),
            Field(f"{prefix}.id_str_size", at + 12, ">H", SIZE),
            Field(f"{prefix}.name_size", at + 14, ">H", SIZE),
            Field(f"{prefix}.vm_state_size", at + 32, ">I", SIZE),
            Field(f"{prefix}.extra_data_size", at + 36, ">I", SIZE),
        ]
        extra, id_size, name_size = (_u(data, at + 36, ">I"), _u(data, at + 12, ">H"),
                                     _u(data, at + 14, ">H"))
        if extra >= 16:
            layout.fields.append(Field(f"{prefix}.disk_size", at + 48, ">Q", SIZE))
        length = 40 + extra + id_size + name_size
        at += length + (-length % 8)


def _entries(data: bytes, table: Table, mask: int) -> list[int]:
    """Distinct non-zero offsets named by a table (masked), within the file."""
    size = struct.calcsize(table.fmt)
    out: list[int] = []
    for i in range(table.count):
        value = _u(data, table.offset + size * i, table.fmt) & mask
        if value and value < len(data) and value not in out:
            out.append(value)
    return out


def _write(buf: bytearray, at: int, raw: bytes) -> None:
    """Store ``raw`` at ``at``, growing the file by at most 1 MiB (a mutated offset may be
    anywhere)."""
    if at < 0 or at + len(raw) > len(buf) + MiB:
        raise ValueError(f"no room at {at:#x}")
    if at + len(raw) > len(buf):
        buf.extend(bytes(at + len(raw) - len(buf)))
    buf[at : at + len(raw)] = raw


# -- qed -------------------------------------------------------------------------------------------


def _qed(data: bytes) -> Layout:
    cluster, table_size = _u(data, 4, "<I"), _u(data, 8, "<I")
    layout = Layout("qed", unit=cluster or 65536)
    layout.fields += [
        Field("cluster_size", 4, "<I", SIZE), Field("table_size", 8, "<I", COUNT),
        Field("header_size", 12, "<I", COUNT), Field("features", 16, "<Q", FLAGS),
        Field("compat_features", 24, "<Q", FLAGS), Field("autoclear_features", 32, "<Q", FLAGS),
        Field("l1_table_offset", 40, "<Q", OFFSET), Field("image_size", 48, "<Q", SIZE),
        Field("backing_filename_offset", 56, "<I", OFFSET, weight=3),
        Field("backing_filename_size", 60, "<I", SIZE, weight=3),
    ]
    entries = min(table_size * cluster // 8, MAX_TABLE_ENTRIES)
    l1 = Table("L1", _u(data, 40, "<Q"), "<Q", entries, lambda o: o, (0, 1))
    layout.tables.append(l1)
    layout.structures += [0, l1.offset]
    for l2 in _entries(data, l1, (1 << 64) - 1)[:MAX_TABLES]:
        layout.tables.append(Table("L2", l2, "<Q", entries, lambda o: o, (0, 1)))
        layout.structures.append(l2)
    name_at = _u(data, 56, "<I")

    def rewrite(buf: bytearray, name: bytes) -> bytearray:
        at = name_at or 64
        _write(buf, at, name)
        struct.pack_into("<II", buf, 56, at, len(name))
        return buf

    if name_at:
        layout.references.append(Reference("backing_filename", rewrite))
    return layout


# -- vdi -------------------------------------------------------------------------------------------


def _vdi(data: bytes) -> Layout:
    layout = Layout("vdi", unit=_u(data, 376, "<I") or MiB)
    layout.fields += [
        Field("version", 68, "<I", ENUM), Field("header_size", 72, "<I", SIZE),
        Field("image_type", 76, "<I", ENUM), Field("image_flags", 80, "<I", FLAGS),
        Field("offset_bmap", 340, "<I", OFFSET), Field("offset_data", 344, "<I", OFFSET),
        Field("sector_size", 360, "<I", SIZE), Field("disk_size", 368, "<Q", SIZE),
        Field("block_size", 376, "<I", SIZE), Field("block_extra", 380, "<I", SIZE),
        Field("blocks_in_image", 384, "<I", COUNT), Field("blocks_allocated", 388, "<I", COUNT),
    ]
    data_at, block = _u(data, 344, "<I"), layout.unit
    layout.tables.append(Table("block map", _u(data, 340, "<I"), "<I",
                               min(_u(data, 384, "<I"), MAX_TABLE_ENTRIES),
                               lambda o: max(0, o - data_at) // block & 0xFFFFFFFF,
                               (0xFFFFFFFF, 0xFFFFFFFE, 0, 1)))
    layout.structures += [0, _u(data, 340, "<I"), data_at]
    return layout


# -- vmdk ------------------------------------------------------------------------------------------

_GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF


def _vmdk(data: bytes) -> Layout:
    layout = Layout("vmdk", unit=512)
    if data.startswith(b"# Disk D"):
        layout.references += _descriptor_references(0, len(data))
        return layout
    _vmdk_header(data, 0, "", layout)
    gd_offset = _u(data, 56, "<Q")
    if gd_offset == _GD_AT_END and len(data) >= 1536 and data[-1024:-1020] == b"KDMV":
        _vmdk_header(data, len(data) - 1024, "footer.", layout)
    desc_at, desc_size = _u(data, 28, "<Q") * 512, _u(data, 36, "<Q") * 512
    if desc_at and desc_size:
        layout.references += _descriptor_references(desc_at, desc_size)
    return layout


def _vmdk_header(data: bytes, at: int, prefix: str, layout: Layout) -> None:
    layout.fields += [
        Field(prefix + "version", at + 4, "<I", ENUM), Field(prefix + "flags", at + 8, "<I", FLAGS),
        Field(prefix + "capacity", at + 12, "<Q", SIZE, 512),
        Field(prefix + "grain_sectors", at + 20, "<Q", COUNT),
        Field(prefix + "desc_offset", at + 28, "<Q", OFFSET, 512),
        Field(prefix + "desc_size", at + 36, "<Q", COUNT),
        Field(prefix + "gtes_per_gt", at + 44, "<I", COUNT),
        Field(prefix + "rgd_offset", at + 48, "<Q", OFFSET, 512),
        Field(prefix + "gd_offset", at + 56, "<Q", OFFSET, 512),
        Field(prefix + "grain_offset", at + 64, "<Q", OFFSET, 512),
        Field(prefix + "compression", at + 77, "<H", ENUM),
    ]
    capacity, grain, gtes = (_u(data, at + 12, "<Q"), _u(data, at + 20, "<Q"),
                             _u(data, at + 44, "<I"))
    if not grain or not gtes:
        return
    tables = min(-(-capacity // (grain * gtes)), MAX_TABLE_ENTRIES)
    for name, sector in (("grain directory", _u(data, at + 56, "<Q")),
                         ("redundant grain directory", _u(data, at + 48, "<Q"))):
        if not sector or sector == _GD_AT_END:
            continue
        gd = Table(prefix + name, sector * 512, "<I", tables, lambda o: o // 512, (0, 1))
        layout.tables.append(gd)
        layout.structures.append(gd.offset)
        for gt in _entries(data, gd, 0xFFFFFFFF)[:MAX_TABLES]:
            layout.tables.append(Table(prefix + "grain table", gt * 512, "<I", gtes,
                                       lambda o: o // 512, (0, 1)))
            layout.structures.append(gt * 512)


def _descriptor_references(at: int, room: int) -> list[Reference]:
    """Names in a descriptor: every extent's file name and the parent hint."""

    def rewriter(which: str) -> Callable[[bytearray, bytes], bytearray]:
        def rewrite(buf: bytearray, name: bytes) -> bytearray:
            space = max(0, min(room, len(buf) - at))
            text = bytes(buf[at : at + space]).split(b"\0", 1)[0]
            lines = text.split(b"\n")
            for i, line in enumerate(lines):
                stripped = line.strip()
                if which == "extent" and stripped[:3] in (b"RW ", b"RDO", b"NOA"):
                    parts = stripped.split(b'"')
                    if len(parts) >= 3:
                        lines[i] = parts[0] + b'"' + name + b'"' + b'"'.join(parts[2:])
                        break
                if which == "parent" and stripped.startswith(b"parentFileNameHint"):
                    lines[i] = b'parentFileNameHint="' + name + b'"'
                    break
            else:
                if which == "parent":
                    lines.insert(1, b'parentFileNameHint="' + name + b'"')
            new = b"\n".join(lines)
            if at == 0:
                return bytearray(new)
            _write(buf, at, new.ljust(space, b"\0") if len(new) <= space else new)
            return buf
        return rewrite

    return [Reference("extent", rewriter("extent")), Reference("parentFileNameHint",
                                                               rewriter("parent"))]


# -- vpc -------------------------------------------------------------------------------------------


def _vpc_footer_fields(at: int, prefix: str) -> list[Field]:
    return [
        Field(prefix + "features", at + 8, ">I", FLAGS),
        Field(prefix + "version", at + 12, ">I", ENUM),
        Field(prefix + "data_offset", at + 16, ">Q", OFFSET),
        Field(prefix + "original_size", at + 40, ">Q", SIZE),
        Field(prefix + "current_size", at + 48, ">Q", SIZE),
        Field(prefix + "cylinders", at + 56, ">H", INT),
        Field(prefix + "heads", at + 58, ">B", INT),
        Field(prefix + "sectors", at + 59, ">B", INT),
        Field(prefix + "disk_type", at + 60, ">I", ENUM),
    ]


def _vhd_checksum(buf: bytearray, at: int, length: int, field_at: int) -> None:
    if at < 0 or at + length > len(buf):
        return
    struct.pack_into(">I", buf, at + field_at, 0)
    struct.pack_into(">I", buf, at + field_at, ~sum(buf[at : at + length]) & 0xFFFFFFFF)


def _vpc(data: bytes) -> Layout:
    layout = Layout("vpc", unit=512)
    end = len(data) - 512
    layout.fields += _vpc_footer_fields(end, "footer.")
    has_copy = data.startswith(b"conectix")
    if has_copy:
        layout.fields += _vpc_footer_fields(0, "footer_copy.")
    dyn = _u(data, end + 16, ">Q")
    layout.structures += [0, end]
    if dyn and dyn + 1024 <= len(data) and data[dyn : dyn + 8] == b"cxsparse":
        layout.structures.append(dyn)
        layout.fields += [
            Field("dynamic.data_offset", dyn + 8, ">Q", OFFSET),
            Field("dynamic.table_offset", dyn + 16, ">Q", OFFSET),
            Field("dynamic.version", dyn + 24, ">I", ENUM),
            Field("dynamic.max_table_entries", dyn + 28, ">I", COUNT),
            Field("dynamic.block_size", dyn + 32, ">I", SIZE),
        ]
        for i in range(8):
            at = dyn + 576 + 24 * i
            code = data[at : at + 4]
            weight = 4 if code != bytes(4) else 0.2
            layout.fields += [Field(f"locator[{i}].data_space", at + 4, ">I", SIZE, weight=weight),
                              Field(f"locator[{i}].data_length", at + 8, ">I", SIZE,
                                    weight=weight),
                              Field(f"locator[{i}].data_offset", at + 16, ">Q", OFFSET,
                                    weight=weight)]
            if code != bytes(4):
                layout.fields.append(Field(f"locator[{i}].code", at, ">I", ENUM, weight=2))
                layout.references.append(Reference(f"locator[{i}]", _vpc_locator(at, code)))
        table = _u(data, dyn + 16, ">Q")
        layout.tables.append(Table("BAT", table, ">I",
                                   min(_u(data, dyn + 28, ">I"), MAX_TABLE_ENTRIES),
                                   lambda o: o // 512, (0xFFFFFFFF, 0)))
        layout.structures.append(table)

        def parent_name(buf: bytearray, name: bytes) -> bytearray:
            text = name.decode("utf-8", "surrogateescape").encode("utf-16-be", "surrogatepass")
            buf[dyn + 64 : dyn + 576] = text[:512].ljust(512, b"\0")
            return buf
        layout.references.append(Reference("parent_name", parent_name))

    def seal(buf: bytearray) -> None:
        _vhd_checksum(buf, len(buf) - 512, 512, 64)
        if buf.startswith(b"conectix"):
            _vhd_checksum(buf, 0, 512, 64)
        if dyn and dyn + 1024 <= len(buf):
            _vhd_checksum(buf, dyn, 1024, 36)

    layout.seal = seal
    return layout


def _vpc_locator(at: int, code: bytes) -> Callable[[bytearray, bytes], bytearray]:
    def rewrite(buf: bytearray, name: bytes) -> bytearray:
        text = name.decode("utf-8", "surrogateescape")
        wide = code in (b"W2ku", b"W2ru")
        raw = text.encode("utf-16-le", "surrogatepass") if wide else name
        data_offset = _u(buf, at + 16, ">Q")
        space = _u(buf, at + 4, ">I")
        if not data_offset or data_offset + len(raw) > len(buf) - 512:
            return buf
        raw = raw[: max(space, 512)]
        buf[data_offset : data_offset + len(raw)] = raw
        struct.pack_into(">I", buf, at + 8, len(raw))
        return buf
    return rewrite


# -- vhdx ------------------------------------------------------------------------------------------


def _vhdx(data: bytes) -> Layout:
    layout = Layout("vhdx", unit=MiB)
    for i, at in enumerate(vb.HEADER_OFFSETS):
        layout.fields += [
            Field(f"header[{i}].sequence_number", at + 8, "<Q", INT),
            Field(f"header[{i}].log_version", at + 64, "<H", ENUM),
            Field(f"header[{i}].version", at + 66, "<H", ENUM),
            Field(f"header[{i}].log_length", at + 68, "<I", SIZE),
            Field(f"header[{i}].log_offset", at + 72, "<Q", OFFSET),
        ]
    regions: dict[uuid.UUID, tuple[int, int]] = {}
    for i, at in enumerate(vb.REGION_OFFSETS):
        count = _u(data, at + 8, "<I")
        layout.fields.append(Field(f"region_table[{i}].entry_count", at + 8, "<I", COUNT))
        for j in range(min(count, 8)):
            entry = at + 16 + 32 * j
            layout.fields += [Field(f"region_table[{i}][{j}].offset", entry + 16, "<Q", OFFSET),
                              Field(f"region_table[{i}][{j}].length", entry + 24, "<I", SIZE),
                              Field(f"region_table[{i}][{j}].required", entry + 28, "<I",
                                    FLAGS)]
            guid = uuid.UUID(bytes_le=data[entry : entry + 16])
            regions.setdefault(guid, (_u(data, entry + 16, "<Q"), _u(data, entry + 24, "<I")))
    layout.structures += [0, *vb.HEADER_OFFSETS, *vb.REGION_OFFSETS]
    md_at = regions.get(vb.METADATA_GUID, (0, 0))[0]
    if md_at and md_at + 64 * KiB <= len(data):
        layout.structures.append(md_at)
        count = _u(data, md_at + 10, "<H")
        layout.fields.append(Field("metadata_table.entry_count", md_at + 10, "<H", COUNT))
        for j in range(min(count, 16)):
            entry = md_at + 32 + 32 * j
            guid = uuid.UUID(bytes_le=data[entry : entry + 16])
            item_at = _u(data, entry + 16, "<I")
            layout.fields += [Field(f"metadata[{guid}].offset", entry + 16, "<I", OFFSET),
                              Field(f"metadata[{guid}].length", entry + 20, "<I", SIZE),
                              Field(f"metadata[{guid}].flags", entry + 24, "<I", FLAGS)]
            value_at = md_at + item_at
            if guid == vb.FILE_PARAMETERS:
                layout.fields += [Field("file_parameters.block_size", value_at, "<I", SIZE),
                                  Field("file_parameters.flags", value_at + 4, "<I", FLAGS)]
            elif guid == vb.VIRTUAL_DISK_SIZE:
                layout.fields.append(Field("virtual_disk_size", value_at, "<Q", SIZE))
            elif guid in (vb.LOGICAL_SECTOR, vb.PHYSICAL_SECTOR):
                layout.fields.append(Field(f"sector_size[{guid}]", value_at, "<I", SIZE))
            elif guid == vb.PARENT_LOCATOR:
                layout.fields.append(Field("parent_locator.key_value_count", value_at + 18,
                                           "<H", COUNT))
                for k in range(min(_u(data, value_at + 18, "<H"), 8)):
                    kv = value_at + 20 + 12 * k
                    layout.fields += [
                        Field(f"parent_locator[{k}].key_offset", kv, "<I", OFFSET, weight=3),
                        Field(f"parent_locator[{k}].value_offset", kv + 4, "<I", OFFSET,
                              weight=3),
                        Field(f"parent_locator[{k}].key_length", kv + 8, "<H", SIZE, weight=3),
                        Field(f"parent_locator[{k}].value_length", kv + 10, "<H", SIZE,
                              weight=3)]
                layout.references.append(Reference("parent_locator.relative_path",
                                                    _vhdx_locator(data, value_at, entry)))
    bat_at, bat_len = regions.get(vb.BAT_GUID, (0, 0))
    if bat_at:
        layout.structures.append(bat_at)
        layout.tables.append(Table("BAT", bat_at, "<Q", min(bat_len // 8, MAX_TABLE_ENTRIES),
                                   lambda o: (o & ~(MiB - 1)) | 6, (0, 1, 2, 3, 6, 7, 4, 5)))

    def seal(buf: bytearray) -> None:
        for at in vb.HEADER_OFFSETS:
            if at + 4 * KiB <= len(buf):
                struct.pack_into("<I", buf, at + 4, 0)
                struct.pack_into("<I", buf, at + 4, crc32c_zeroed(bytes(buf[at : at + 4 * KiB]),
                                                                  4))
        for at in vb.REGION_OFFSETS:
            if at + 64 * KiB <= len(buf):
                struct.pack_into("<I", buf, at + 4, 0)
                struct.pack_into("<I", buf, at + 4,
                                 crc32c_zeroed(bytes(buf[at : at + 64 * KiB]), 4))

    layout.seal = seal
    return layout


def _vhdx_locator(data: bytes, value_at: int,
                  entry: int) -> Callable[[bytearray, bytes], bytearray]:
    """Rewrite the locator item with ``relative_path`` set to the name (other keys kept)."""

    def rewrite(buf: bytearray, name: bytes) -> bytearray:
        entries: dict[str, str] = {}
        for k in range(min(_u(buf, value_at + 18, "<H"), 16)):
            kv = value_at + 20 + 12 * k
            ko, vo, kl, vl = struct.unpack_from("<IIHH", buf, kv)
            key = bytes(buf[value_at + ko : value_at + ko + kl]).decode("utf-16-le", "replace")
            value = bytes(buf[value_at + vo : value_at + vo + vl]).decode("utf-16-le", "replace")
            entries[key] = value
        entries.pop("absolute_win32_path", None)
        entries["relative_path"] = name.decode("utf-8", "surrogateescape")
        item = _locator_item(entries)
        _write(buf, value_at, item)
        struct.pack_into("<I", buf, entry + 20, len(item))
        return buf
    return rewrite


def _locator_item(entries: dict[str, str]) -> bytes:
    header = struct.pack("<16sHH", vb.VHDX_LOCATOR_TYPE.bytes_le, 0, len(entries))
    table, strings = b"", b""
    base = len(header) + 12 * len(entries)
    for key, value in entries.items():
        k = key.encode("utf-16-le", "surrogatepass")
        v = value.encode("utf-16-le", "surrogatepass")
        table += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(k),
                             len(k) & 0xFFFF, len(v) & 0xFFFF)
        strings += k + v
    return header + table + strings


# -- partition tables ------------------------------------------------------------------------------

_EXTENDED = (0x05, 0x0F, 0x85)


def _partitions(data: bytes) -> Layout:
    layout = Layout("raw", unit=512)
    layout.fields.append(Field("mbr.signature", 510, "<H", ENUM))
    ext_start = 0
    for slot in range(4):
        at = 446 + 16 * slot
        layout.fields += _mbr_entry_fields(f"mbr[{slot}]", at)
        if data[at + 4] in _EXTENDED:
            ext_start = _u(data, at + 8, "<I")
    # Follow the EBR chain (bounded): each EBR's second entry links to the next.
    ebr, seen = ext_start, 0
    while ebr and ebr * 512 + 512 <= len(data) and seen < 16:
        at = ebr * 512
        layout.structures.append(at)
        for slot in range(2):
            layout.fields += _mbr_entry_fields(f"ebr[{seen}][{slot}]", at + 446 + 16 * slot)
        link = _u(data, at + 446 + 16 + 8, "<I")
        ebr = ext_start + link if link else 0
        seen += 1
    for sector in (512, 4096):
        _gpt(data, sector, layout)
    layout.seal = _seal_gpt
    return layout


def _mbr_entry_fields(name: str, at: int) -> list[Field]:
    return [Field(f"{name}.boot", at, "<B", FLAGS), Field(f"{name}.type", at + 4, "<B", ENUM),
            Field(f"{name}.start_lba", at + 8, "<I", OFFSET, 512),
            Field(f"{name}.sectors", at + 12, "<I", SIZE, 512)]


def _gpt(data: bytes, sector: int, layout: Layout) -> None:
    for which, at in (("primary", sector), ("backup", len(data) - sector)):
        if at <= 0 or data[at : at + 8] != b"EFI PART":
            continue
        prefix = f"gpt{sector}.{which}"
        layout.structures.append(at)
        layout.fields += [
            Field(f"{prefix}.revision", at + 8, "<I", ENUM),
            Field(f"{prefix}.header_size", at + 12, "<I", SIZE),
            Field(f"{prefix}.my_lba", at + 24, "<Q", OFFSET, sector),
            Field(f"{prefix}.alternate_lba", at + 32, "<Q", OFFSET, sector),
            Field(f"{prefix}.first_usable_lba", at + 40, "<Q", OFFSET, sector),
            Field(f"{prefix}.last_usable_lba", at + 48, "<Q", OFFSET, sector),
            Field(f"{prefix}.entries_lba", at + 72, "<Q", OFFSET, sector),
            Field(f"{prefix}.entry_count", at + 80, "<I", COUNT, weight=3),
            Field(f"{prefix}.entry_size", at + 84, "<I", SIZE, weight=3),
        ]
        entries_at = _u(data, at + 72, "<Q") * sector
        size = _u(data, at + 84, "<I")
        for i in range(min(_u(data, at + 80, "<I"), 128)):
            entry = entries_at + i * size
            if entry + 56 > len(data) or data[entry : entry + 16] == bytes(16):
                continue
            layout.fields += [Field(f"{prefix}.entry[{i}].first_lba", entry + 32, "<Q", OFFSET,
                                    sector),
                              Field(f"{prefix}.entry[{i}].last_lba", entry + 40, "<Q", OFFSET,
                                    sector),
                              Field(f"{prefix}.entry[{i}].attributes", entry + 48, "<Q", FLAGS)]


def _seal_gpt(buf: bytearray) -> None:
    """Recompute entry array and header CRCs of every GPT header found (512 and 4096)."""
    for sector in (512, 4096):
        for at in (sector, len(buf) - sector):
            if at <= 0 or buf[at : at + 8] != b"EFI PART":
                continue
            header_size = _u(buf, at + 12, "<I")
            entries_at = _u(buf, at + 72, "<Q") * sector
            length = _u(buf, at + 80, "<I") * _u(buf, at + 84, "<I")
            if length <= 4 * MiB and entries_at + length <= len(buf):
                struct.pack_into("<I", buf, at + 88,
                                 zlib.crc32(bytes(buf[entries_at : entries_at + length])))
            if 0 < header_size <= sector:
                struct.pack_into("<I", buf, at + 16, 0)
                struct.pack_into("<I", buf, at + 16, zlib.crc32(bytes(buf[at : at + header_size])))


_DESCRIBERS: dict[str, Callable[[bytes], Layout]] = {
    "qcow2": _qcow2, "qed": _qed, "vdi": _vdi, "vmdk": _vmdk, "vpc": _vpc, "vhdx": _vhdx,
    "raw": _partitions,
}
