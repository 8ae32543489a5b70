"""The one contract of the driver stack: :class:`BlockNode`.

An image is a tree of nodes, as in QEMU's block layer: a *protocol* node at the bottom that alone
touches the OS (``file``), *format* nodes above it that map guest offsets onto their children
(``raw``, ``qcow2``, ...), and *filter* nodes on top that change one aspect of the I/O. Backing
files and external data files are children too.

The public verbs (:meth:`BlockNode.pread`, :meth:`~BlockNode.pwrite`, :meth:`~BlockNode.flush`,
:meth:`~BlockNode.zero`, :meth:`~BlockNode.discard`, :meth:`~BlockNode.block_status`) are
implemented once, here: they check the range and the node's mode, keep the statistics, and call
the driver's private verb (``_pread``...), which may assume valid input -- as nbdkit's
``backend_pread`` and QEMU's ``bdrv_co_preadv`` do before calling a plugin or driver.

All I/O is ``async`` on trio. A driver that needs mutual exclusion (a metadata cache being
filled, an allocation) takes its own ``trio.Lock``; the base class holds none, so reads of
different ranges run concurrently.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from vdiskfs.block.stats import Counters, NodeStats, Op, StatsSnapshot
from vdiskfs.errors import FormatError, NoSpaceError, RangeError, ReadOnlyError, UnsupportedError

__all__ = [
    "BlockNode", "BlockStatus", "Child", "Control", "FilterNode", "NodeKind", "SnapshotEntry",
    "opened",
]

# Plain ints for the per-request accounting (an IntEnum lookup costs more than the rest).
_READ = int(Op.READ)

Buffer = bytes | bytearray | memoryview


class NodeKind(enum.StrEnum):
    PROTOCOL = "protocol"
    FORMAT = "format"
    FILTER = "filter"


class BlockStatus(enum.IntFlag):
    """What a range of a node reads as, as QEMU's ``BDRV_BLOCK_*`` flags.

    ``DATA``: reads return stored data (not known to be zero). ``ZERO``: reads return zeros.
    ``ALLOCATED``: this node (not its backing file) defines the range. A range that is neither
    DATA nor ZERO reads from the backing file.
    """

    DATA = 1
    ZERO = 2
    ALLOCATED = 4


@dataclass(frozen=True, slots=True)
class Child:
    """An edge of the tree. ``role`` is QEMU's child name: file, backing, data-file, image."""

    role: str
    node: BlockNode
    owned: bool = True


@dataclass(frozen=True, slots=True)
class Control:
    """A setting of a node that the user may read and change while the node is open (a
    throttle's limits): a writable file beside the node's statistics in a mount.

    ``read`` renders the current setting as one line of text; ``write`` takes a whole new
    setting in the same syntax and raises a :class:`~vdiskfs.errors.VdiskError` (EINVAL) that
    names what is wrong, leaving the setting as it was.
    """

    name: str
    read: Callable[[], str]
    write: Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One snapshot as every node names it (the mount and ``info`` need no more): a format's
    internal snapshot (qcow2) or its protocol's (an RBD image's)."""

    #: QEMU's snapshot ID and tag, as recorded in the image (any text: not trusted).
    id: str
    name: str
    #: The guest disk size when the snapshot was taken: what a view of it presents.
    size: int


class BlockNode:
    """Base class of every driver. Subclasses set the class attributes and implement ``_*``."""

    #: Driver name as the user spells it (``--format qcow2``) and as stats files show it.
    driver: ClassVar[str] = "?"
    kind: ClassVar[NodeKind] = NodeKind.FORMAT
    #: The class of this driver's own counters (a ``@dataclass`` subclass of Counters).
    counters_class: ClassVar[type[Counters]] = Counters

    def __init__(self, *, read_only: bool = True, label: str = "") -> None:
        #: Size in bytes that the node presents; set by :meth:`open`.
        self.size = 0
        self.read_only = read_only
        #: A protocol node whose writes may extend it (a qcow2 file growing as it allocates).
        self.growable = False
        #: Human name of what this node is: a path for files, the image path for formats.
        self.label = label
        self.children: list[Child] = []
        self.stats = NodeStats()
        self.counters = self.counters_class()
        #: Warnings raised while opening the tree (probed raw, skipped partition entries...).
        self.warnings: list[str] = []
        self._closed = False

    # -- life cycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Second phase of opening: read headers, open children. Cheap constructor, async open."""

    async def aclose(self) -> None:
        """Flush what the driver buffers, then close owned children. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._close()
        finally:
            for child in reversed(self.children):
                if child.owned:
                    await child.node.aclose()

    async def _close(self) -> None:
        """Driver hook: release what the node holds. Children are closed by the base."""

    async def __aenter__(self) -> BlockNode:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the tree ---------------------------------------------------------------------------------

    def add_child(self, role: str, node: BlockNode, *, owned: bool = True) -> BlockNode:
        self.children.append(Child(role, node, owned))
        return node

    def child(self, role: str) -> BlockNode | None:
        for edge in self.children:
            if edge.role == role:
                return edge.node
        return None

    def unallocated_source(self) -> tuple[BlockNode, int] | None:
        """Where reads of a range that :meth:`block_status` reports neither DATA nor ZERO come
        from: ``(node, offset shift)`` (a format node's backing file, the same node under a
        filter or a window), or None when nothing is below (the range reads as zeros)."""
        return None

    def walk(self) -> Iterator[tuple[int, str, BlockNode]]:
        """Pre-order ``(depth, role, node)`` over the tree; the root has role ``""``."""
        stack: list[tuple[int, str, BlockNode]] = [(0, "", self)]
        while stack:
            depth, role, node = stack.pop()
            yield depth, role, node
            for edge in reversed(node.children):
                stack.append((depth + 1, edge.role, edge.node))

    # -- information ------------------------------------------------------------------------------

    async def allocated_size(self) -> int:
        """Bytes this node's own storage takes on the host, as QEMU's
        ``bdrv_get_allocated_file_size``: a protocol node's allocated blocks; for the others
        the sum over the children that store this node's bytes (not its backing file)."""
        total = 0
        for edge in self.children:
            if edge.role != "backing":
                total += await edge.node.allocated_size()
        return total

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``vdiskfs info`` (cluster size, feature flags...)."""
        return {}

    def content_key(self) -> str | None:
        """A name of this node's content as of open that stays the same, across opens and
        processes, exactly while the content does (a remote file's URL, pinned validator and
        size), for caches kept on disk; None when there is none (the default: a local file is
        already local, an NBD export can change unseen). It may be secret (a URL's query):
        show only a hash of it."""
        return None

    def controls(self) -> list[Control]:
        """The settings of this node that can change while it is open; most have none."""
        return []

    def stats_snapshot(self) -> StatsSnapshot:
        return self.stats.snapshot(self.counters.snapshot())

    # -- snapshots: one interface at every layer ---------------------------------------------------

    def internal_snapshots(self) -> list[SnapshotEntry]:
        """The snapshots that this node can show beside its current state, in the order that
        :meth:`open_snapshot` numbers them: a qcow2's own, an RBD image's; none by default.
        A node without its own passes its child's up where QEMU's ``bdrv_snapshot_fallback``
        does (a filter, a format with no snapshot table and no other data child)."""
        return []

    async def open_snapshot(self, snapshot: str | int) -> BlockNode:
        """A read-only node showing a snapshot of this open node beside it, chosen by ID or
        name (IDs first, as QEMU), or by its position in :meth:`internal_snapshots`. It may
        read through this node's children or connection: close it before this node."""
        raise UnsupportedError(f"{self.driver} nodes have no snapshots", path=self.label,
                               field="snapshot")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r} size={self.size}>"

    # -- the public verbs: checked and accounted once ---------------------------------------------

    def _check_read(self, op: Op, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.stats.invalid_request(op)
            raise RangeError(
                f"{op.name.lower()} of {length} bytes at {offset} is outside the node "
                f"(size {self.size})",
                path=self.label,
            )

    def _check_write(self, op: Op, offset: int, length: int) -> None:
        if self.read_only:
            self.stats.invalid_request(op)
            raise ReadOnlyError("opened read-only", path=self.label)
        if offset < 0 or length < 0:
            self.stats.invalid_request(op)
            raise RangeError(f"{op.name.lower()} at negative offset", path=self.label)
        if offset + length > self.size and not self.growable:
            self.stats.invalid_request(op)
            raise NoSpaceError(
                f"{op.name.lower()} of {length} bytes at {offset} is past the end of the disk "
                f"(size {self.size})",
                path=self.label,
            )

    async def pread(self, offset: int, length: int) -> Buffer:
        """Read exactly ``length`` bytes at ``offset``; the range must lie within :attr:`size`."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            self._check_read(Op.READ, offset, length)
            return b""  # an empty read inside the node
        stats = self.stats
        cookie = stats.start()
        try:
            data = await self._pread(offset, length)
        except BaseException:
            stats.fail(_READ, cookie)
            raise
        stats.done(_READ, length, cookie)
        return data

    async def pwrite(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``."""
        length = len(data)
        self._check_write(Op.WRITE, offset, length)
        if length == 0:
            return
        stats = self.stats
        cookie = stats.start()
        try:
            await self._pwrite(offset, data)
        except BaseException:
            stats.fail(Op.WRITE, cookie)
            raise
        stats.done(Op.WRITE, length, cookie)
        if offset + length > stats.wr_highest_offset:
            stats.wr_highest_offset = offset + length

    async def zero(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make the range read as zeros; ``may_unmap`` lets the driver deallocate it."""
        self._check_write(Op.ZERO, offset, length)
        if length == 0:
            return
        stats = self.stats
        cookie = stats.start()
        try:
            await self._zero(offset, length, may_unmap)
        except BaseException:
            stats.fail(Op.ZERO, cookie)
            raise
        stats.done(Op.ZERO, length, cookie)

    async def discard(self, offset: int, length: int) -> None:
        """Hint that the range is unused; its contents become unspecified (often zero)."""
        self._check_write(Op.DISCARD, offset, length)
        if length == 0:
            return
        stats = self.stats
        cookie = stats.start()
        try:
            await self._discard(offset, length)
        except BaseException:
            stats.fail(Op.DISCARD, cookie)
            raise
        stats.done(Op.DISCARD, length, cookie)

    async def flush(self) -> None:
        """Make every completed write durable: this node's metadata, then all its children."""
        if self.read_only:
            return
        stats = self.stats
        cookie = stats.start()
        try:
            await self._flush()
            for edge in self.children:
                await edge.node.flush()
        except BaseException:
            stats.fail(Op.FLUSH, cookie)
            raise
        stats.done(Op.FLUSH, 0, cookie)

    async def truncate(self, size: int) -> None:
        """Cut (or extend) the node to ``size`` bytes: a format driver giving back space it
        reserved at the end of its file. Only protocol nodes that can do it implement it
        (``file``); filters pass it on; everything else refuses (:class:`UnsupportedError`)."""
        raise UnsupportedError(f"{self.driver}: truncating is not supported", path=self.label)

    async def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """Status of the run starting at ``offset``: ``(flags, run_length)``, 0 < run <= length."""
        self._check_read(Op.BLOCK_STATUS, offset, length)
        if length == 0:
            raise RangeError("block_status of an empty range", path=self.label)
        stats = self.stats
        cookie = stats.start()
        try:
            status, run = await self._block_status(offset, length)
        except BaseException:
            stats.fail(Op.BLOCK_STATUS, cookie)
            raise
        stats.done(Op.BLOCK_STATUS, 0, cookie)
        if not 0 < run <= length:
            raise FormatError(
                f"driver {self.driver} returned a block-status run of {run} for {length} bytes",
                path=self.label,
                offset=offset,
            )
        return status, run

    # -- driver verbs: input already validated ----------------------------------------------------

    async def _pread(self, offset: int, length: int) -> Buffer:
        raise NotImplementedError

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        raise UnsupportedError(f"{self.driver}: writing is not supported", path=self.label)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        # Generic fallback, as QEMU's bdrv_co_do_pwrite_zeroes: write a zero buffer in chunks.
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            await self._pwrite(offset, zeros if n == len(zeros) else zeros[:n])
            offset += n

    async def _discard(self, offset: int, length: int) -> None:
        """Default: discard is advisory; a driver that cannot deallocate ignores it."""

    async def _flush(self) -> None:
        """Default: nothing buffered in this node."""

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        return BlockStatus.DATA | BlockStatus.ALLOCATED, length


class FilterNode(BlockNode):
    """A node with one child, ``file``, that passes through every verb it does not override.

    As nbdkit's ``filter_pread`` falls back to the next layer, the defaults call the child's
    *public* verbs, so the child keeps its own statistics. ``owns_child`` False: the child
    belongs to another tree (a partition window onto its disk) and stays open when this closes.
    """

    kind = NodeKind.FILTER

    def __init__(self, child: BlockNode, *, read_only: bool | None = None, label: str = "",
                 owns_child: bool = True) -> None:
        super().__init__(
            read_only=child.read_only if read_only is None else read_only,
            label=label or child.label,
        )
        self.add_child("file", child, owned=owns_child)

    @property
    def file(self) -> BlockNode:
        return self.children[0].node

    async def open(self) -> None:
        self.size = self.file.size

    def unallocated_source(self) -> tuple[BlockNode, int] | None:
        return self.file.unallocated_source()

    def content_key(self) -> str | None:
        return self.file.content_key()

    def internal_snapshots(self) -> list[SnapshotEntry]:
        return self.file.internal_snapshots()

    async def open_snapshot(self, snapshot: str | int) -> BlockNode:
        view = await self.file.open_snapshot(snapshot)
        try:
            return await self._over_snapshot(view)
        except BaseException:
            await view.aclose()
            raise

    async def _over_snapshot(self, view: BlockNode) -> BlockNode:
        """This filter over ``view`` (its child's snapshot), open; the view alone by default
        (a snapshot is read-only: nothing to filter that this filter would change)."""
        return view

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await self.file.pread(offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self.file.pwrite(offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.file.zero(offset, length, may_unmap=may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        await self.file.discard(offset, length)

    async def truncate(self, size: int) -> None:
        if self.read_only:  # a read-only view of a writable file (a replayed log) cuts nothing
            raise ReadOnlyError("opened read-only", path=self.label)
        await self.file.truncate(size)
        self.size = self.file.size

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        return await self.file.block_status(offset, length)


N = TypeVar("N", bound=BlockNode)


async def opened(node: N) -> N:
    """``node`` after :meth:`~BlockNode.open`; closed (with what it owns) if that fails."""
    try:
        await node.open()
    except BaseException:
        await node.aclose()
        raise
    return node
