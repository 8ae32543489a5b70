"""Recipes for VMDK test images: qemu-img/qemu-io made ones, and hand-built ones from the spec.

``qemu-img create -f vmdk -o subformat=...`` makes every variant QEMU writes; what QEMU cannot
write -- a VMware-style stream-optimized file whose grain directory is at the end, descriptors
mixing extent kinds, damaged headers -- is built here byte by byte from VMware's "Virtual Disk
Format 5.0", and checked against ``qemu-img convert`` where QEMU can read it.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from tests.support.images import create, qemu_io

__all__ = [
    "GD_AT_END",
    "HEADER",
    "build_stream_optimized",
    "embed_descriptor",
    "make_vmdk",
    "patch_header",
    "write_descriptor",
]

SECTOR = 512
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
#: SparseExtentHeader: magic, version, flags, capacity, grainSize, descriptorOffset,
#: descriptorSize, numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, check bytes,
#: compressAlgorithm.
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_FIELDS = ("magic", "version", "flags", "capacity", "grain_sectors", "desc_offset", "desc_size",
           "gtes_per_gt", "rgd_offset", "gd_offset", "grain_offset", "unclean", "check",
           "compression")
_NL_CHECK = b"\n \r\n"


def make_vmdk(path: str | os.PathLike[str], size: int | str, subformat: str = "monolithicSparse",
              *, io: tuple[str, ...] = (), **options: object) -> Path:
    """``qemu-img create -f vmdk -o subformat=...``, then the qemu-io commands ``io``."""
    create(path, size, "vmdk", subformat=subformat, **options)
    if io:
        qemu_io(path, *io, fmt="vmdk")
    return Path(path)


def write_descriptor(path: str | os.PathLike[str], *, create_type: str, extents: list[str],
                     cid: int = 0x12345678, parent_cid: int = 0xFFFFFFFF,
                     parent_hint: str | None = None, extra: str = "") -> Path:
    """A stand-alone descriptor file with the given extent lines (``RW 2048 FLAT "x" 0``)."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", "",
              'ddb.adapterType = "ide"']
    text = "\n".join(lines) + "\n" + extra
    Path(path).write_text(text)
    return Path(path)


def patch_header(path: str | os.PathLike[str], *, offset: int = 0, **fields: int | bytes) -> None:
    """Rewrite fields of the sparse header at ``offset`` (``gtes_per_gt=0``...)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        values = dict(zip(_FIELDS, HEADER.unpack(f.read(HEADER.size)), strict=True))
        values.update(fields)
        f.seek(offset)
        f.write(HEADER.pack(*(values[name] for name in _FIELDS)))


def embed_descriptor(path: str | os.PathLike[str], text: str, *, capacity: int | None = None
                     ) -> None:
    """Replace the embedded descriptor of a sparse file made by qemu-img (it reserves 20
    sectors at sector 1); ``capacity=0`` turns the file into a descriptor in a sparse header,
    whose extents are opened as a descriptor file's are."""
    raw = text.encode()
    with open(path, "r+b") as f:
        values = dict(zip(_FIELDS, HEADER.unpack(f.read(HEADER.size)), strict=True))
        area = values["desc_size"] * SECTOR
        assert values["desc_offset"] == 1 and len(raw) <= area, "no room for the descriptor"
        f.seek(SECTOR)
        f.write(raw + bytes(area - len(raw)))
    if capacity is not None:
        patch_header(path, capacity=capacity)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % SECTOR)


def _meta_marker(sectors: int, kind: int) -> bytes:
    return _pad(struct.pack("<QII", sectors, 0, kind))


def build_stream_optimized(path: str | os.PathLike[str], data: bytes, *,
                           grain_sectors: int = 128, gtes_per_gt: int = 512,
                           descriptor: str | None = None) -> Path:
    """A VMware-style ``streamOptimized`` file: header with ``gdOffset = GD_AT_END``, deflated
    grains behind markers, grain-table, grain-directory and footer markers, end of stream.

    All-zero grains are left out (entry 0), as VMware does. ``len(data)`` need not be a whole
    number of grains: the last grain is short, as in QEMU's streams.
    """
    grain_size = grain_sectors * SECTOR
    data = _pad(data)  # the guest is whole sectors; a short last grain still holds them
    capacity = len(data) // SECTOR
    n_grains = -(-len(data) // grain_size)
    n_tables = -(-n_grains // gtes_per_gt)
    if descriptor is None:
        descriptor = (
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            'createType="streamOptimized"\n\n'
            f'RW {capacity} SPARSE "{Path(path).name}"\n\n'
            'ddb.adapterType = "lsilogic"\n'
        )
    desc = _pad(descriptor.encode())
    desc_sectors = len(desc) // SECTOR
    grain_offset = 1 + desc_sectors
    flags = 1 | (1 << 16) | (1 << 17)  # newline check, compressed, markers

    def header(gd_offset: int) -> bytes:
        return _pad(HEADER.pack(b"KDMV", 3, flags, capacity, grain_sectors, 1, desc_sectors,
                                gtes_per_gt, 0, gd_offset, grain_offset, 0, _NL_CHECK, 1))

    out = bytearray(header(GD_AT_END) + desc)
    tables = [[0] * gtes_per_gt for _ in range(n_tables)]
    for grain in range(n_grains):
        chunk = data[grain * grain_size : (grain + 1) * grain_size]
        if not any(chunk):
            continue
        packed = zlib.compress(chunk)
        tables[grain // gtes_per_gt][grain % gtes_per_gt] = len(out) // SECTOR
        out += _pad(struct.pack("<QI", grain * grain_sectors, len(packed)) + packed)
    directory = [0] * n_tables
    for index, table in enumerate(tables):
        if not any(table):
            continue
        raw = _pad(struct.pack(f"<{gtes_per_gt}I", *table))
        out += _meta_marker(len(raw) // SECTOR, 1)
        directory[index] = len(out) // SECTOR
        out += raw
    raw_gd = _pad(struct.pack(f"<{n_tables}I", *directory))
    out += _meta_marker(len(raw_gd) // SECTOR, 2)
    gd_offset = len(out) // SECTOR
    out += raw_gd
    out += _meta_marker(1, 3) + header(gd_offset) + _meta_marker(0, 0)
    Path(path).write_bytes(bytes(out))
    return Path(path)
