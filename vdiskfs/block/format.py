"""Base class of format drivers: a node that maps guest offsets onto its ``file`` child."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from vdiskfs.block.context import OpenContext
from vdiskfs.block.node import BlockNode, Buffer, NodeKind, SnapshotEntry, opened
from vdiskfs.errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    from vdiskfs.drivers.format.runs import Run

__all__ = ["FormatNode", "SnapshotEntry"]


class FormatNode(BlockNode):
    """A format node: constructed with its protocol child and the open context (cheap), then
    :meth:`open` reads the headers through the child.

    Subclasses implement :meth:`probe` and the private verbs; metadata reads go through
    :meth:`read_metadata`, which turns "past the end of the file" into a :class:`FormatError`
    naming the field instead of a range error deep in the stack.
    """

    kind = NodeKind.FORMAT
    #: Whether the driver can write at all (``--rw``); read-only drivers refuse early.
    supports_write: ClassVar[bool] = False
    #: Whether the format has internal snapshots that :meth:`open_snapshot` opens (and
    #: ``OpenContext.snapshot`` selects); the others refuse a snapshot by name at open.
    supports_snapshots: ClassVar[bool] = False

    def __init__(self, file: BlockNode, ctx: OpenContext, *, owns_file: bool = True) -> None:
        super().__init__(read_only=ctx.read_only, label=ctx.path)
        self.ctx = ctx
        # A view of another node's image (an internal snapshot beside the current state)
        # reads the same file, which that node owns and closes.
        self.add_child("file", file, owned=owns_file)
        #: The backing file (parent image), once :meth:`open_backing` opened it.
        self.backing: BlockNode | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        """Score how sure the driver is that these bytes are its format (0: not at all)."""
        return 0

    @property
    def file(self) -> BlockNode:
        return self.children[0].node

    def internal_snapshots(self) -> list[SnapshotEntry]:
        """The image's internal snapshots, in table order. A format without a snapshot table
        (:attr:`supports_snapshots` false) shows its file's (an RBD image's) when the file is
        its only child, as QEMU's ``bdrv_snapshot_fallback``: a backing file or extents would
        not be in the file's snapshot."""
        if self.supports_snapshots or self._has_other_children():
            return []
        return self.file.internal_snapshots()

    async def open_snapshot(self, snapshot: str | int) -> BlockNode:
        """A read-only node showing an internal snapshot of this open image beside it, chosen
        by ID or name (IDs first, as QEMU), or by its position in :meth:`internal_snapshots`.
        It reads through this node's children: close it before this node.

        Without a snapshot table of its own: this format opened read-only over the file's
        snapshot (an ``rbd:pool/image@snap`` node), which the view owns."""
        if self.supports_snapshots or self._has_other_children():
            raise UnsupportedError(f"{self.driver} images have no internal snapshots",
                                   path=self.label, field="snapshot")
        file = await self.file.open_snapshot(snapshot)
        options = replace(self.ctx.options, read_only=True, snapshot=None)
        try:
            view = type(self)(file, replace(self.ctx, options=options, path=file.label,
                                            snapshot=None))
        except BaseException:
            await file.aclose()
            raise
        return await opened(view)

    def _has_other_children(self) -> bool:
        return any(edge.role != "file" for edge in self.children)

    async def read_metadata(self, offset: int, length: int, what: str) -> bytes:
        """Read ``length`` bytes of the structure ``what`` from the file child, checked."""
        if offset < 0 or length < 0 or offset + length > self.file.size:
            raise FormatError(
                f"{what} ({length} bytes at {offset:#x}) lies outside the file "
                f"(size {self.file.size})",
                path=self.label,
                field=what,
                offset=offset,
            )
        return bytes(await self.file.pread(offset, length))

    async def open_backing(self, reference: str, *, field: str, format: str | None = None,
                           format_field: str | None = None) -> BlockNode | None:
        """Open the backing file that the image names ``reference`` (in its ``field``) as the
        ``backing`` child and :attr:`backing`; ``format`` where the image records it (in its
        ``format_field``), else probed. None, and nothing opened, when the user asked for no
        backing files: callers that cannot write without the backing file's bytes refuse a
        writable open then."""
        if not self.ctx.options.backing:
            return None
        node = await self.ctx.open_child(reference, role="backing", field_name=field,
                                         format=format, format_field=format_field)
        self.add_child("backing", node)
        self.backing = node
        return node

    # -- the backing file: one rule for every format ----------------------------------------------

    def unallocated_source(self) -> tuple[BlockNode, int] | None:
        return None if self.backing is None else (self.backing, 0)

    def backing_length(self, offset: int, length: int) -> int:
        """How many of the guest bytes ``[offset, offset + length)`` the backing file holds,
        from ``offset`` on; the rest read as zeros.

        A backing file may be shorter than the image (QEMU allows it for qcow2, qed, vmdk,
        vhdx and vpc, and a user may resize an overlay), and an image may have none or be opened
        without it: past its end, or without one, an unallocated range reads as zeros. This and
        :meth:`read_backing` are the only places that rule is written, as QEMU's
        ``bdrv_co_preadv_part`` zero-fills past a child's end in one place.
        """
        backing = self.backing
        if backing is None or offset >= backing.size:
            return 0
        return min(length, backing.size - offset)

    async def read_backing(self, offset: int, length: int) -> Buffer:
        """The guest bytes ``[offset, offset + length)`` as the backing file shows them: its
        bytes where it has them, zeros past its end or without one. The backing file's own
        buffer is handed back when it covers the whole range (no copy)."""
        present = self.backing_length(offset, length)
        if present and present == length:
            assert self.backing is not None
            return await self.backing.pread(offset, length)
        out = bytearray(length)
        if present:
            assert self.backing is not None
            out[:present] = await self.backing.pread(offset, present)
        return out

    async def read_compressed(self, run: Run) -> Buffer:
        """Driver hook of the run executor: the ``run.length`` guest bytes of a COMPRESSED run
        (the driver reads and decompresses what ``run.payload`` describes)."""
        raise self.format_error(f"{self.driver}: compressed data is not supported here")

    def format_error(self, message: str, *, field: str | None = None,
                     offset: int | None = None) -> FormatError:
        return FormatError(message, path=self.label, field=field, offset=offset)

    async def _pread(self, offset: int, length: int) -> Buffer:
        raise NotImplementedError
