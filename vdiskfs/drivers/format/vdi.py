"""Format driver ``vdi``: VirtualBox Disk Images, version 1.1, static and dynamic.

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

Writes. A static image has every block allocated: writes go in place. A write to a block that
is not allocated (never, or discarded) takes data block number ``blocks_allocated`` -- the next
one after the data area's used blocks, as QEMU's ``vdi_co_pwritev`` -- zeroes it and writes the
data into it, then updates the block map and ``blocks_allocated`` *in memory*. They reach the
file at :meth:`~VdiNode.flush` (and close), in an order that makes every crash a leak, never a
block shared by two guest blocks or a map entry pointing at data never written:

1. the file is flushed: the new blocks' data is durable;
2. the header, with the new ``blocks_allocated``, is written and flushed;
3. the changed block map sectors are written (the base class then flushes the file).

A crash before 2 loses the allocations (the next session reuses the same data blocks, zeroing
them first); between 2 and 3 it leaves ``blocks_allocated`` higher than the map uses: the top
blocks leak. QEMU writes the header and then the map too, but per request and without flushes;
writing the map first would be worse, as the next allocation would hand out a block the map
already uses. ``qemu-img check`` reports such a leak as "allocated blocks mismatch" (it counts it
as a corruption and cannot repair vdi); vdiskfs repairs it on the next writable open by lowering
``blocks_allocated`` when the unused blocks are the top ones, which is how a crash leaves them.

Zeroing a range (:meth:`~vdiskfs.block.node.BlockNode.zero`) never allocates: an unallocated
block already reads as zeros (vdi has no backing file), an allocated one is zeroed in place.
QEMU has no write-zeroes for vdi and writes zero buffers, allocating; the guest sees the same.
"""

from __future__ import annotations

import array
import dataclasses
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from vdiskfs.block.context import OpenContext
from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import register
from vdiskfs.drivers.format.runs import (
    Run,
    RunCounters,
    RunKind,
    coalesce,
    le_bytes,
    le_table,
    read_runs,
    runs_status,
    write_runs,
)
from vdiskfs.errors import FormatError, NoSpaceError, UnsupportedError

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
#: Offset of ``blocks_allocated`` in the 512-byte header (after ``blocks_in_image``).
BLOCKS_ALLOCATED_OFFSET = 0x184
#: Block map entries per 512-byte sector: the unit in which the map is written back.
BMAP_SECTOR_ENTRIES = SECTOR_SIZE // 4


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
    """The run counters (the block map is read whole on open: no cache to count), and what
    writes did."""

    #: Data blocks allocated by writes.
    blocks_allocated: int = 0
    #: Header and block-map write-backs (at flush or close), and the map sectors written.
    metadata_writebacks: int = 0
    bmap_sectors_written: int = 0


def unused_top_blocks(bmap: array.array[int], blocks_allocated: int) -> int | None:
    """How many data blocks at the top of ``[0, blocks_allocated)`` the map does not use, or
    None when allocating would be unsafe: a data block used twice, or an entry at or past
    ``blocks_allocated`` (the next allocation would hand that block out again).

    A crash between writing the header and the block map (see the module docstring) leaves
    unused top blocks; lowering ``blocks_allocated`` by this many repairs the image.
    """
    used = [entry for entry in bmap if entry < DISCARDED]
    if len(set(used)) != len(used):
        return None
    top = max(used, default=-1) + 1
    if top > blocks_allocated:
        return None
    return blocks_allocated - top


@register
class VdiNode(FormatNode):
    """A VirtualBox VDI image (version 1.1, static or dynamic)."""

    driver = "vdi"
    counters_class = VdiCounters
    counters: VdiCounters
    supports_write: ClassVar[bool] = True

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        #: Serialises allocations and metadata write-back (QEMU's ``bmap_lock`` write side).
        self._alloc_lock = trio.Lock()
        #: Block-map sectors changed in memory and not yet written back.
        self._dirty_bmap_sectors: set[int] = set()
        self._header_dirty = False

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        if len(head) >= _HEADER.size and struct.unpack_from("<I", head, 64)[0] == SIGNATURE:
            return 100
        return 0

    async def open(self) -> None:
        raw = await self.read_metadata(0, _HEADER.size, "header")
        self._raw_header = bytearray(raw)
        self.header = VdiHeader.parse(raw)
        disk_size = validate_header(self.header, label=self.label, file_size=self.file.size)
        blocks = -(-disk_size // self.header.block_size)
        table = await self.read_metadata(self.header.offset_bmap, 4 * blocks, "block_map")
        self.bmap = le_table(table, 4)
        self.blocks_allocated = self.header.blocks_allocated
        self.geometry = VdiGeometry(
            disk_size=disk_size,
            block_size=self.header.block_size,
            offset_data=self.header.offset_data,
            file_size=self.file.size,
            label=self.label,
        )
        self.size = disk_size
        if not self.read_only:
            await self._prepare_for_writes()

    async def _prepare_for_writes(self) -> None:
        """Refuse a map that allocation would corrupt further; repair a crash's leak."""
        unused = unused_top_blocks(self.bmap, self.blocks_allocated)
        if unused is None:
            raise self.format_error(
                "the block map uses a data block twice, or one at or past blocks_allocated "
                f"({self.blocks_allocated}): allocating would hand out a block in use; open the "
                "image read-only", field="block_map")
        if unused:
            # Only a crash between the header and block-map writes leaves this (see above).
            self.blocks_allocated -= unused
            await self._write_header()
            await self.file.flush()
            self.ctx.warn(f"{self.label}: {unused} data blocks at the end were allocated but "
                          "unused (an interrupted write); blocks_allocated lowered to "
                          f"{self.blocks_allocated}")

    def info(self) -> dict[str, Any]:
        return {"cluster-size": self.header.block_size}

    def _map(self, offset: int, length: int) -> list[Run]:
        return coalesce(map_range(self.geometry, self.bmap, offset, length))

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await read_runs(self, self._map(offset, length))

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        return runs_status(self, map_range(self.geometry, self.bmap, offset, length))

    # -- writes -----------------------------------------------------------------------------------

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        runs = self._map(offset, len(view))
        if all(run.kind is RunKind.DATA for run in runs):
            await write_runs(runs, offset, view, self.file, self._allocate)
            return
        async with self._alloc_lock:
            # Mapped again under the lock: a concurrent writer may have allocated meanwhile.
            await write_runs(self._map(offset, len(view)), offset, view, self.file,
                             self._allocate)

    async def _allocate(self, run: Run, chunk: memoryview) -> None:
        """Give the blocks of ``run`` (unallocated, consecutive) consecutive new data blocks,
        write ``chunk`` into them over zeros, and map them (in memory; see :meth:`_flush`)."""
        block_size = self.geometry.block_size
        first_block = run.offset // block_size
        count = (run.end - 1) // block_size - first_block + 1
        index = self.blocks_allocated
        if index + count > self.header.blocks_in_image:
            # Only an image with holes in its data area gets here (a static one with a
            # discarded block): vdiskfs allocates at the end only, as QEMU does.
            raise NoSpaceError(
                f"no data block left to allocate: {index} of {self.header.blocks_in_image} are "
                "taken (discarded blocks are not reused)", path=self.label)
        start = self.geometry.offset_data + index * block_size
        # The data blocks may hold a crashed session's bytes: zero them (past the end of the
        # file this only extends it), then write the data into them.
        await self.file.zero(start, count * block_size)
        await self.file.pwrite(start + run.offset - first_block * block_size, chunk)
        for i in range(count):
            self.bmap[first_block + i] = index + i
            self._dirty_bmap_sectors.add((first_block + i) // BMAP_SECTOR_ENTRIES)
        self.blocks_allocated = index + count
        self._header_dirty = True
        self.counters.blocks_allocated += count
        self.geometry = dataclasses.replace(self.geometry, file_size=self.file.size)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        # Unallocated blocks read as zeros already; allocated ones are zeroed in place.
        for run in self._map(offset, length):
            if run.kind is RunKind.DATA:
                await self.file.zero(run.host_offset, run.length, may_unmap=may_unmap)

    # -- metadata write-back ----------------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._alloc_lock:
            if not self._header_dirty and not self._dirty_bmap_sectors:
                return
            self.counters.metadata_writebacks += 1
            # The order is the crash-safety argument of the module docstring.
            await self.file.flush()
            if self._header_dirty:
                await self._write_header()
                await self.file.flush()
                self._header_dirty = False
            await self._write_bmap_sectors()

    async def _write_header(self) -> None:
        struct.pack_into("<I", self._raw_header, BLOCKS_ALLOCATED_OFFSET, self.blocks_allocated)
        await self.file.pwrite(0, bytes(self._raw_header))

    async def _write_bmap_sectors(self) -> None:
        sectors = sorted(self._dirty_bmap_sectors)
        # Neighbouring sectors go out in one write.
        i = 0
        while i < len(sectors):
            j = i
            while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1:
                j += 1
            first = sectors[i] * BMAP_SECTOR_ENTRIES
            end = min((sectors[j] + 1) * BMAP_SECTOR_ENTRIES, len(self.bmap))
            await self.file.pwrite(self.header.offset_bmap + 4 * first,
                                   le_bytes(self.bmap[first:end]))
            self.counters.bmap_sectors_written += j - i + 1
            i = j + 1
        self._dirty_bmap_sectors.clear()

    async def _close(self) -> None:
        if not self.read_only:
            await self.flush()
