"""The extents of a VMDK image as objects: each kind maps, writes and zeroes its own bytes.

The node (:mod:`.driver`) finds the extent of a guest offset by ``bisect`` over the extents'
first guest bytes, splits every request at extent boundaries and hands each piece to its
extent, in offsets relative to the extent's start, as QEMU's ``vmdk_co_preadv`` loops over
``find_extent``. Here the two kinds without metadata -- ``FLAT`` (and ``VMFS``: the bytes at an
offset of a file) and ``ZERO`` (no file) -- and what every kind shares; the sparse kinds are in
:mod:`.sparse_extent`.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.drivers.format.runs import LruCache, Run, RunCounters, RunKind
from vdiskfs.errors import FormatError, ReadOnlyError

if TYPE_CHECKING:
    from vdiskfs.block.format import FormatNode

__all__ = [
    "Extent",
    "FileExtent",
    "FlatExtent",
    "SparseShared",
    "VmdkCounters",
    "ZeroExtent",
    "read_checked",
]

#: Grain tables kept per node: 512 entries (2 KiB) each, so 1 MiB maps 16 GiB of 64 KiB grains.
GT_CACHE_TABLES = 512


@dataclass(slots=True)
class VmdkCounters(RunCounters):
    """The run counters (``data_reads``, ``backing_reads``, ``zero_bytes_read``...) and the
    caches'."""

    #: Grain table lookups served from the cache, and tables read from an extent file.
    gt_cache_hits: int = 0
    gt_cache_misses: int = 0
    #: Compressed-grain lookups served inflated from the cache, and grains read and inflated.
    grain_cache_hits: int = 0
    grain_cache_misses: int = 0
    #: Compressed bytes read from extent files.
    compressed_bytes_read: int = 0
    #: Grains and grain tables appended to extent files by writes.
    grains_allocated: int = 0
    gts_allocated: int = 0
    #: Bytes of new grains not covered by the request: filled from the parent or with zeros
    #: (``cow_backing_bytes`` of them read from the parent).
    cow_bytes: int = 0
    cow_backing_bytes: int = 0
    #: Grain table entries set to "zeroed grain" by write-zeroes requests.
    zeroed_grains: int = 0
    #: Grain tables written back (primary and redundant copy count once), and directory
    #: entries written for new tables.
    gt_writebacks: int = 0
    gd_writebacks: int = 0
    #: New CIDs written (the first write after a writable open).
    cid_updates: int = 0


@dataclass(slots=True)
class SparseShared:
    """What the sparse extents of one image share, owned by its node: the node itself (its
    parent's bytes fill new grains, and its backing rule applies), its counters, the caches
    (bounded per image, not per extent: an image may have thousands of extents), and how
    many grain tables wait dirty for a write-back."""

    image: FormatNode
    counters: VmdkCounters
    #: (extent number, grain directory index) -> table. Dirty tables live in their extent
    #: until written back, and are looked up there first.
    gt_cache: LruCache[tuple[int, int], array[int]] = field(
        default_factory=lambda: LruCache(GT_CACHE_TABLES))
    #: (extent number, grain's offset in its file) -> inflated grain; the node sizes it at
    #: open by the largest compressed grain.
    grain_cache: LruCache[tuple[int, int], bytes] = field(default_factory=lambda: LruCache(1))
    dirty_tables: int = 0


async def read_checked(node: BlockNode, offset: int, length: int, what: str, label: str,
                       *, field: str | None = None, field_offset: int | None = None) -> bytes:
    """Read a structure from an extent file; a range outside the file is a FormatError."""
    if offset < 0 or length < 0 or offset + length > node.size:
        raise FormatError(
            f"{what} ({length} bytes at {offset:#x}) lies outside the file ({node.size} bytes)",
            path=label,
            field=field or what,
            offset=offset if field_offset is None else field_offset,
        )
    return bytes(await node.pread(offset, length))


class Extent:
    """One extent, as opened: ``size`` guest bytes from ``guest_start``.

    ``number`` is its place in the descriptor (from 1), which messages name; ``image_label``
    the image whose request it refuses. The verbs take offsets relative to the extent's start
    and ranges inside it; runs come back in guest offsets, for the node's run executor.
    """

    def __init__(self, *, number: int, guest_start: int, size: int, type_name: str,
                 image_label: str, writable: bool = True) -> None:
        self.number = number
        self.guest_start = guest_start
        self.size = size
        #: Type as the descriptor writes it (``SPARSE``, ``FLAT``...); ``""`` for a
        #: monolithic file.
        self.type_name = type_name
        self.image_label = image_label
        #: False for an ``RDONLY`` extent line: the extent refuses writes.
        self.writable = writable

    @property
    def guest_end(self) -> int:
        return self.guest_start + self.size

    @property
    def file(self) -> BlockNode | None:
        """The node holding the extent's bytes (None: none)."""
        return None

    @property
    def label(self) -> str:
        return ""

    def info(self) -> dict[str, Any]:
        """The extent as ``qemu-img info`` lists it, keys in its order."""
        return {"virtual-size": self.size, "filename": self.label, "format": self.type_name}

    def check_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(f"extent {self.number} ({self.label}) is RDONLY in the "
                                "descriptor", path=self.image_label, field="extent")

    async def map(self, offset: int, length: int) -> list[Run]:
        """Runs for the extent's bytes ``[offset, offset + length)``."""
        raise NotImplementedError

    async def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        raise NotImplementedError

    async def write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    async def zero(self, offset: int, length: int, may_unmap: bool) -> None:
        raise NotImplementedError


class ZeroExtent(Extent):
    """A ``ZERO`` extent: reads as zeros, stores nothing."""

    async def map(self, offset: int, length: int) -> list[Run]:
        return [Run(RunKind.ZERO, self.guest_start + offset, length)]

    async def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        return BlockStatus.ZERO | BlockStatus.ALLOCATED, length

    async def write(self, offset: int, data: memoryview) -> None:
        # Zeros are what it holds already: writing them changes nothing (a guest rewriting a
        # whole disk); anything else cannot be kept.
        if bytes(data).count(0) != len(data):
            raise ReadOnlyError(
                f"extent {self.number} is a ZERO extent: it cannot store data",
                path=self.image_label, field="extent", offset=self.guest_start + offset,
            )

    async def zero(self, offset: int, length: int, may_unmap: bool) -> None:
        """Reads as zeros already."""


class FileExtent(Extent):
    """An extent whose bytes lie in a file (every kind but ZERO); ``label`` names it in
    messages (default: the file's)."""

    def __init__(self, *, file: BlockNode, label: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._file = file
        self._label = file.label if label is None else label

    @property
    def file(self) -> BlockNode:
        return self._file

    @property
    def label(self) -> str:
        return self._label


class FlatExtent(FileExtent):
    """A ``FLAT`` (or ``VMFS``) extent: the bytes at ``file_offset`` of ``file``, in place."""

    def __init__(self, *, file_offset: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Where the extent's first byte lies in the file.
        self.file_offset = file_offset

    async def map(self, offset: int, length: int) -> list[Run]:
        return [Run(RunKind.DATA, self.guest_start + offset, length, self.file_offset + offset,
                    self._file)]

    async def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        # A flat extent is as sparse as its file: ask the file, as QEMU's RECURSE does.
        status, run = await self._file.block_status(self.file_offset + offset, length)
        kind = BlockStatus.ZERO if status & BlockStatus.ZERO else BlockStatus.DATA
        return kind | BlockStatus.ALLOCATED, run

    async def write(self, offset: int, data: memoryview) -> None:
        self.check_writable()
        await self._file.pwrite(self.file_offset + offset, data)

    async def zero(self, offset: int, length: int, may_unmap: bool) -> None:
        self.check_writable()
        await self._file.zero(self.file_offset + offset, length, may_unmap=may_unmap)
