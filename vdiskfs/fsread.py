"""Reading a few files out of a file system inside an image, without mounting it: what
``vdiskfs boot`` needs to find the kernel a disk would boot.

ext2/3/4 is read with dissect's ``dissect.extfs`` (pure Python, maintained, reads extents,
64-bit and metadata_csum file systems as Debian's mke2fs makes them), over a synchronous file
object on the partition's node (:mod:`vdiskfs.block.syncfile`): no loop device, no root, and
every byte comes through the same stack (and statistics) as the guest's own reads. Other file
systems are recognised by their magic so that an error can name them, not read.

Call everything here from a worker thread of the node's trio loop (the file object hands each
read back to the loop). dissect trusts the image; every exception its parsing can raise on a
damaged file system becomes a :class:`~vdiskfs.errors.FormatError` naming the file system and
the path, and every read is bounded (``limit``), so a hostile image gives an error, not a
traceback or a hang.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, TypeVar

from vdiskfs.errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    from dissect.extfs.extfs import INode

__all__ = ["EXT_MAGIC_OFFSET", "ExtVolume", "identify_fs"]

_T = TypeVar("_T")
#: Bytes :func:`identify_fs` needs from the start of a partition.
PROBE_SIZE = 0x10048
EXT_MAGIC_OFFSET = 0x438
#: (name, offset, magic): enough to name what a partition holds in an error message.
_MAGICS: tuple[tuple[str, int, bytes], ...] = (
    ("ext2/3/4", EXT_MAGIC_OFFSET, b"\x53\xef"),
    ("xfs", 0, b"XFSB"),
    ("btrfs", 0x10040, b"_BHRfS_M"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("LVM2 physical volume", 0x218, b"LVM2 001"),
    ("swap", 0xFF6, b"SWAPSPACE2"),
    ("ntfs", 3, b"NTFS    "),
    ("vfat", 0x52, b"FAT32   "),
    ("vfat", 0x36, b"FAT16   "),
    ("vfat", 0x36, b"FAT12   "),
    ("iso9660", 0x8001, b"CD001"),
    ("squashfs", 0, b"hsqs"),
)
#: Symbolic links followed in one lookup, as Linux's MAXSYMLINKS.
MAX_SYMLINKS = 40


def identify_fs(head: bytes) -> str | None:
    """The file system whose magic is in ``head`` (the first :data:`PROBE_SIZE` bytes of a
    partition), or None."""
    for name, offset, magic in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def _damaged(where: str, exc: BaseException) -> FormatError:
    return FormatError(f"damaged ext2/3/4 file system: {type(exc).__name__}: {exc}", path=where)


# What dissect's parsers raise on bytes that do not hold together: its own Error (also its
# FileNotFoundError and NotADirectoryError), cstruct's EOFError on a short read, and plain
# Python errors from fields used as counts or indices. A loop in an extent tree is a
# RecursionError. Anything else is a bug, and travels up as one.
try:
    from dissect.extfs.exceptions import Error as _DissectError
except ImportError:  # reported when a volume is opened
    _DissectError = OSError
_PARSE_ERRORS = (_DissectError, EOFError, ValueError, IndexError, KeyError, OverflowError,
                 struct.error, RecursionError, NotImplementedError, UnicodeDecodeError)


class ExtVolume:
    """An ext2/3/4 file system, read-only; ``where`` names it in errors
    (``"disk.qcow2 partition 1"``)."""

    def __init__(self, fh: IO[bytes], where: str) -> None:
        try:
            from dissect.extfs import ExtFS
        except ImportError as exc:  # a broken install: pyproject.toml requires it
            raise UnsupportedError("reading ext2/3/4 needs the dissect.extfs package "
                                   f"({exc})", path=where) from None
        self.where = where
        try:
            self._fs = ExtFS(fh)
            self.uuid = str(self._fs.uuid)
            self.label = self._fs.volume_name
        except _PARSE_ERRORS as exc:
            raise _damaged(where, exc) from None

    def _lookup(self, path: str) -> INode | None:
        """The inode at ``path`` (absolute), symbolic links followed; None if it is missing."""
        parts = [p for p in path.split("/") if p]
        node = self._fs.root
        # The directories walked so far: a relative link target starts from the last one.
        stack: list[INode] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                node = stack.pop() if stack else self._fs.root
                continue
            if node.filetype != stat.S_IFDIR:
                return None
            child = next((e for e in node.iterdir() if e.filename == part), None)
            if child is None:
                return None
            if child.filetype == stat.S_IFLNK:
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise FormatError(f"{path}: too many levels of symbolic links",
                                      path=self.where)
                target = child.link
                if target.startswith("/"):
                    node, stack = self._fs.root, []
                parts = [p for p in target.split("/") if p] + parts
                continue
            stack.append(node)
            node = child
        return node

    def _guarded(self, path: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except _PARSE_ERRORS as exc:
            raise _damaged(f"{self.where}: {path}", exc) from None

    def is_file(self, path: str) -> bool:
        """A regular file is at ``path`` (links followed)."""
        def check() -> bool:
            node = self._lookup(path)
            return node is not None and node.filetype == stat.S_IFREG
        return self._guarded(path, check)

    def listdir(self, path: str) -> list[str]:
        """The names in the directory ``path`` ([] when it is missing or not a directory)."""
        def names() -> list[str]:
            node = self._lookup(path)
            if node is None or node.filetype != stat.S_IFDIR:
                return []
            return [e.filename for e in node.iterdir() if e.filename not in (".", "..")]
        return self._guarded(path, names)

    def read(self, path: str, limit: int) -> bytes:
        """The whole regular file at ``path``; a FormatError if it is missing, not a regular
        file, larger than ``limit`` bytes or shorter than its size says."""
        def read() -> bytes:
            node = self._lookup(path)
            if node is None:
                raise FormatError(f"{path}: no such file", path=self.where)
            if node.filetype != stat.S_IFREG:
                raise FormatError(f"{path}: not a regular file", path=self.where)
            if node.size > limit:
                raise FormatError(f"{path}: {node.size} bytes, more than the {limit} read",
                                  path=self.where)
            data = node.open().read(node.size)
            if len(data) != node.size:
                raise FormatError(f"{path}: {len(data)} bytes readable of {node.size}",
                                  path=self.where)
            return bytes(data)
        return self._guarded(path, read)
