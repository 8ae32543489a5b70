"""All-zero writes become write-zeroes: QEMU's ``detect-zeroes=unmap``.

A guest or a tool writing zeros through the mount (``mkfs``, ``dd if=/dev/zero``, a file system
zeroing freed blocks) then allocates nothing in a sparse format, and frees what it overwrites
where the format can (a qcow2 v3 zero cluster, a punched hole in a raw file), instead of storing
megabytes of zeros.
"""

from __future__ import annotations

from vdiskfs.block.node import BlockNode, Buffer

__all__ = ["is_zero", "write_detecting_zeroes"]

_CHUNK = 1 << 16
_ZEROS = bytes(_CHUNK)


def is_zero(data: Buffer) -> bool:
    """Whether every byte of ``data`` is zero; a few microseconds for 128 KiB of zeros, and most
    data is refused at its first or last byte without a scan."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    if n == 0:
        return True
    if data[0] or data[-1]:
        return False
    # bytes.startswith(prefix, start) compares in place (memcmp), without slicing copies.
    startswith = data.startswith
    full = n - n % _CHUNK
    for at in range(0, full, _CHUNK):
        if not startswith(_ZEROS, at):
            return False
    rest = n - full
    return rest == 0 or startswith(_ZEROS[:rest], full)


async def write_detecting_zeroes(node: BlockNode, offset: int, data: Buffer) -> bool:
    """Write ``data`` at ``offset``, as :meth:`BlockNode.zero` with unmap when it is all zeros.
    Returns whether it was written as zeros."""
    if is_zero(data):
        await node.zero(offset, len(data), may_unmap=True)
        return True
    await node.pwrite(offset, data)
    return False
