"""Breaking images on purpose, and expecting the refusal.

:func:`patch` and :func:`read_field` change and read a header field in place (a hostile value,
a flag a crash left set); :func:`read_everything` opens an image and reads all of it, the way
that reaches every table; :func:`assert_refused` expects that to fail with a
:class:`~vdiskfs.errors.VdiskError` naming the file and, where given, the field.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.errors import VdiskError

__all__ = ["assert_refused", "patch", "read_everything", "read_field", "set_bits"]

MiB = 1 << 20


def patch(path: Path, offset: int, fmt: str, *values: int | bytes) -> None:
    """Overwrite the ``struct`` field(s) ``fmt`` at ``offset`` of the file with ``values``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def read_field(path: Path, offset: int, fmt: str) -> int:
    """The integer ``struct`` field ``fmt`` at ``offset`` of the file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def set_bits(path: Path, offset: int, fmt: str, bits: int) -> None:
    """Set ``bits`` in the integer field ``fmt`` at ``offset`` (a feature flag)."""
    patch(path, offset, fmt, read_field(path, offset, fmt) | bits)


async def read_everything(path: Path, **options: object) -> None:
    """Open ``path`` (``options``: :class:`~vdiskfs.block.context.OpenOptions` fields) and
    read the whole disk, a MiB at a time."""
    node = await open_image(str(path), OpenOptions(**options))  # type: ignore[arg-type]
    try:
        for offset in range(0, node.size, MiB):
            await node.pread(offset, min(MiB, node.size - offset))
    finally:
        await node.aclose()


async def assert_refused(path: Path, error: type[VdiskError], match: str | None = None, *,
                         field: str | None = None, where: Path | None = None,
                         **options: object) -> VdiskError:
    """:func:`read_everything` fails with ``error`` (matching ``match``), naming the file
    ``where`` (by default ``path`` itself) and, if given, the field."""
    with pytest.raises(error, match=match) as info:
        await read_everything(path, **options)
    exc = info.value
    assert exc.path is not None and Path(exc.path) == (where or path), exc
    if field is not None:
        assert exc.field == field, exc
    return exc
