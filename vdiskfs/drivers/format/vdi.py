"""Format driver ``vdi``: VirtualBox Disk Images, version 1.1, static and dynamic (read-only).

Layout (all little-endian)::

    0x000  pre-header: 64 bytes of text, signature 0xbeda107f, version (0x00010001 = 1.1)
    0x048  header: header size, image type (1 dynamic, 2 static), offsets of the block map
           and of the data, sector size, disk size, block size, block counts, four UUIDs
    bmap   one 32-bit entry per block: the index of the block in the data area, or
           0xffffffff (never allocated: reads as zero) or 0xfffffffe (discarded: zero)
    data   blocks of ``block_size`` bytes, in allocation order

The checks on open are QEMU's ``vdi_open`` (block/vdi.c): version 1.1, sector-aligned block map
and data offsets, 512-byte sectors, 1 MiB blocks, a disk that fits the block map, no parent or
link UUID (differencing VDIs are VirtualBox snapshots; QEMU refuses them too). vdiskfs also
refuses ``block_extra`` (per-block prefix data, which QEMU silently ignores and so would
misread), image types other than static and dynamic, and block map entries that point outside
the file.

The block map is small (4 bytes per MiB of disk) and is read whole on open, as QEMU does; only
the entries the disk size needs are read, however large ``blocks_in_image`` claims to be.
Writes (allocating blocks at the end of the data area, updating the map, then the header's
``blocks_allocated``) are a later step; :func:`map_range` already reports what a writer needs.
"""

from __future__ import annotations

import array
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockStatus, Buffer
from vdiskfs.block.registry import register
from vdiskfs.drivers.format.runs import (
    Run,
    RunCounters,
    RunKind,
    coalesce,
    first_run,
    le_table,
    read_runs,
    run_status,
)
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["VdiCounters", "VdiGeometry", "VdiHeader", "VdiNode", "map_range"]

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
#: Block map entry of a block never allocated (contents arbitrary: read as zeros, as QEMU).
UNALLOCATED = 0xFFFFFFFF
#: Block map entry of a block discarded after allocation (contents zero).
DISCARDED = 0xFFFFFFFE
SECTOR_SIZE = 512
#: QEMU supports only the default block size (its CONFIG_VDI_BLOCK_SIZE is off).
BLOCK_SIZE = 1 << 20
#: QEMU's VDI_BLOCKS_IN_IMAGE_MAX: the block map must fit in an int when read in one go.
BLOCKS_IN_IMAGE_MAX = (0x80000000 - SECTOR_SIZE) // 4
DISK_SIZE_MAX = BLOCKS_IN_IMAGE_MAX * BLOCK_SIZE
#: Size of a version 1.1 header after the pre-header (VirtualBox's VDIHEADER1).
HEADER_1_1_SIZE = 0x180
PRE_HEADER_SIZE = 0x48

_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")
assert _HEADER.size == 512


@dataclass(frozen=True, slots=True)
class VdiHeader:
    """The 512 bytes at the start of a VDI file, as QEMU's ``VdiHeader``."""

    text: bytes
    signature: int
    version: int
    header_size: int
    image_type: int
    image_flags: int
    description: bytes
    offset_bmap: int
    offset_data: int
    cylinders: int
    heads: int
    sectors: int
    sector_size: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks_in_image: int
    blocks_allocated: int
    uuid_image: uuid.UUID
    uuid_last_snap: uuid.UUID
    uuid_link: uuid.UUID
    uuid_parent: uuid.UUID

    @classmethod
    def parse(cls, data: bytes) -> VdiHeader:
        (text, signature, version, header_size, image_type, image_flags, description,
         offset_bmap, offset_data, cylinders, heads, sectors, sector_size, _unused1, disk_size,
         block_size, block_extra, blocks_in_image, blocks_allocated, uuid_image, uuid_last_snap,
         uuid_link, uuid_parent, _unused2) = _HEADER.unpack_from(data)
        return cls(
            text, signature, version, header_size, image_type, image_flags, description,
            offset_bmap, offset_data, cylinders, heads, sectors, sector_size, disk_size,
            block_size, block_extra, blocks_in_image, blocks_allocated,
            # VirtualBox stores UUIDs in the little-endian (Microsoft GUID) layout.
            uuid.UUID(bytes_le=uuid_image), uuid.UUID(bytes_le=uuid_last_snap),
            uuid.UUID(bytes_le=uuid_link), uuid.UUID(bytes_le=uuid_parent),
        )

    @property
    def is_static(self) -> bool:
        return self.image_type == TYPE_STATIC


def validate_header(header: VdiHeader, *, label: str, file_size: int) -> int:
    """Check ``header`` as QEMU's ``vdi_open`` does (and a little more); return the disk size.

    Like QEMU, an odd disk size (``VBoxManage convertfromraw`` makes them) is rounded up to a
    whole sector.
    """

    def bad(message: str, field: str) -> FormatError:
        return FormatError(message, path=label, field=field)

    def unsupported(message: str, field: str) -> UnsupportedError:
        return UnsupportedError(message, path=label, field=field)

    if header.signature != SIGNATURE:
        raise bad(f"not a VDI image (signature {header.signature:#010x})", "signature")
    if header.version != VERSION_1_1:
        raise unsupported(
            f"VDI version {header.version >> 16}.{header.version & 0xFFFF} is not supported "
            "(only 1.1)", "version")
    if header.header_size < HEADER_1_1_SIZE:
        raise bad(f"header size {header.header_size} is smaller than a version 1.1 header "
                  f"({HEADER_1_1_SIZE})", "header_size")
    if header.image_type not in (TYPE_DYNAMIC, TYPE_STATIC):
        raise unsupported(f"image type {header.image_type} is not supported (only dynamic and "
                          "static; undo and differencing images are VirtualBox snapshots)",
                          "image_type")
    if header.disk_size > DISK_SIZE_MAX:
        raise unsupported(f"disk size {header.disk_size:#x} exceeds the maximum "
                          f"{DISK_SIZE_MAX:#x}", "disk_size")
    if header.offset_bmap % SECTOR_SIZE:
        raise unsupported(f"block map offset {header.offset_bmap:#x} is not sector aligned",
                          "offset_bmap")
    if header.offset_data % SECTOR_SIZE:
        raise unsupported(f"data offset {header.offset_data:#x} is not sector aligned",
                          "offset_data")
    if header.sector_size != SECTOR_SIZE:
        raise unsupported(f"sector size {header.sector_size} is not {SECTOR_SIZE}",
                          "sector_size")
    if header.block_size != BLOCK_SIZE:
        raise unsupported(f"block size {header.block_size} is not {BLOCK_SIZE}", "block_size")
    if header.block_extra != 0:
        raise unsupported(f"{header.block_extra} bytes of extra data per block are not "
                          "supported", "block_extra")
    if header.blocks_in_image > BLOCKS_IN_IMAGE_MAX:
        raise unsupported(f"{header.blocks_in_image} blocks exceed the maximum "
                          f"{BLOCKS_IN_IMAGE_MAX}", "blocks_in_image")
    disk_size = -(-header.disk_size // SECTOR_SIZE) * SECTOR_SIZE
    if disk_size > header.blocks_in_image * header.block_size:
        raise bad(f"disk size {disk_size} does not fit the {header.blocks_in_image} blocks of "
                  "the block map", "disk_size")
    if not uuid_is_nil(header.uuid_link):
        raise unsupported("images with a link UUID (VirtualBox snapshots) are not supported",
                          "uuid_link")
    if not uuid_is_nil(header.uuid_parent):
        raise unsupported("differencing images (non-nil parent UUID) are not supported",
                          "uuid_parent")
    if header.offset_bmap < PRE_HEADER_SIZE + HEADER_1_1_SIZE:
        raise bad(f"block map offset {header.offset_bmap:#x} overlaps the header",
                  "offset_bmap")
    blocks = -(-disk_size // header.block_size)
    if header.offset_data < header.offset_bmap + 4 * blocks:
        raise bad(f"data offset {header.offset_data:#x} overlaps the block map "
                  f"({blocks} entries at {header.offset_bmap:#x})", "offset_data")
    if header.offset_data > file_size:
        raise bad(f"data offset {header.offset_data:#x} lies past the end of the file "
                  f"({file_size} bytes)", "offset_data")
    return disk_size


def uuid_is_nil(value: uuid.UUID) -> bool:
    return value.int == 0


@dataclass(frozen=True, slots=True)
class VdiGeometry:
    """What the mapping needs to know about one image; ``label`` names it in errors."""

    disk_size: int
    block_size: int
    offset_data: int
    file_size: int
    label: str


def map_range(geom: VdiGeometry, bmap: array.array[int], offset: int,
              length: int) -> Iterator[Run]:
    """Yield the runs of the guest range ``[offset, offset + length)``, one per block touched.

    Pure: no I/O. Raises :class:`FormatError` naming the block map entry when an allocated
    block lies (even partly) outside the file.
    """
    block_size = geom.block_size
    end = offset + length
    while offset < end:
        block, in_block = divmod(offset, block_size)
        n = min(block_size - in_block, end - offset)
        entry = bmap[block]
        if entry == UNALLOCATED:
            yield Run(RunKind.BACKING, offset, n)
        elif entry == DISCARDED:
            yield Run(RunKind.ZERO, offset, n)
        else:
            block_start = geom.offset_data + entry * block_size
            # The last block of the disk may be short of a full block in the file.
            needed = min(block_size, geom.disk_size - block * block_size)
            if block_start + needed > geom.file_size:
                raise FormatError(
                    f"block {block} is mapped to data block {entry} at {block_start:#x}, "
                    f"past the end of the file ({geom.file_size} bytes)",
                    path=geom.label,
                    field=f"block_map[{block}]",
                    offset=block_start,
                )
            yield Run(RunKind.DATA, offset, n, block_start + in_block)
        offset += n


@dataclass(slots=True)
class VdiCounters(RunCounters):
    """vdi's counters are the run counters: its block map is read whole on open, so it has no
    cache to count hits and misses of."""


@register
class VdiNode(FormatNode):
    """A VirtualBox VDI image (version 1.1, static or dynamic), read-only."""

    driver = "vdi"
    counters_class = VdiCounters
    counters: VdiCounters
    supports_write: ClassVar[bool] = False

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        if len(head) >= _HEADER.size and struct.unpack_from("<I", head, 64)[0] == SIGNATURE:
            return 100
        return 0

    async def open(self) -> None:
        if not self.read_only:
            raise UnsupportedError("vdi: writing is not supported yet (open read-only)",
                                   path=self.label)
        raw = await self.read_metadata(0, _HEADER.size, "header")
        self.header = VdiHeader.parse(raw)
        disk_size = validate_header(self.header, label=self.label, file_size=self.file.size)
        blocks = -(-disk_size // self.header.block_size)
        table = await self.read_metadata(self.header.offset_bmap, 4 * blocks, "block_map")
        self.bmap = le_table(table, 4)
        self.geometry = VdiGeometry(
            disk_size=disk_size,
            block_size=self.header.block_size,
            offset_data=self.header.offset_data,
            file_size=self.file.size,
            label=self.label,
        )
        self.size = disk_size

    def info(self) -> dict[str, Any]:
        return {"cluster-size": self.header.block_size}

    async def _pread(self, offset: int, length: int) -> Buffer:
        runs = coalesce(map_range(self.geometry, self.bmap, offset, length))
        return await read_runs(runs, self.file, None, self.counters)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        run = first_run(map_range(self.geometry, self.bmap, offset, length))
        return run_status(run, None)
