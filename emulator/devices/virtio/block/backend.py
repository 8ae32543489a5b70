"""virtio-blk backend: the I/O against a vdiskfs :class:`~vdiskfs.block.node.BlockNode`.

The node is the top of a tree opened by the VMM (``open_image``) and shared with the FUSE view,
so the guest's requests go through the same nodes, caches and statistics as any other reader.
The backend does not own the node: the VMM closes it after the guest has stopped.

:func:`status_of` is the one place where an error becomes a virtio status byte (rust-vmm's
``virtio-blk`` ``Error::status``).
"""

from __future__ import annotations

from emulator.devices.virtio.block.request import ID_BYTES, SECTOR_SIZE, RequestError, Status
from vdiskfs.block.node import BlockNode, Buffer
from vdiskfs.errors import ReadOnlyError, UnsupportedError

__all__ = ["BlockBackend", "status_of"]


def status_of(error: BaseException) -> Status:
    """The status byte that answers a request failed with ``error``.

    A refused request carries its own status; a feature the stack refuses (a format that
    cannot discard...) is UNSUPP; every other error of the stack, or of the host below it, is
    IOERR -- the guest sees an I/O error, the VMM goes on.
    """
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, UnsupportedError):
        return Status.UNSUPP
    return Status.IOERR


class BlockBackend:
    """A disk as the device sees it: whole sectors, an identifier, read-only or not."""

    def __init__(self, node: BlockNode, *, read_only: bool, serial: str) -> None:
        self.node = node
        self.read_only = read_only or node.read_only
        #: GET_ID answer: the serial, truncated or NUL-padded to 20 bytes.
        self.device_id = serial.encode("utf-8", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\0")

    @property
    def capacity_sectors(self) -> int:
        # A size that is not a multiple of 512 hides its last partial sector from the guest.
        return self.node.size // SECTOR_SIZE

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("the disk is read-only", path=self.node.label)

    async def read(self, offset: int, length: int) -> Buffer:
        return await self.node.pread(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        await self.node.pwrite(offset, data)

    async def flush(self) -> None:
        if not self.read_only:
            await self.node.flush()

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        await self.node.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        self._check_writable()
        await self.node.zero(offset, length, may_unmap=may_unmap)

