"""qcow2 images with internal snapshots, made by the reference tools, and their expected bytes.

:func:`make_snapshot_image` builds a small image of a named variant with three snapshots taken
by ``qemu-img snapshot -c`` between ``qemu-io`` writes that overwrite, zero and discard part of
what the previous snapshot holds. :func:`snapshot_reference` is QEMU's view of one snapshot
(``qemu-img convert -l snapshot.name=NAME``), :func:`applied_reference` the guest disk after
``qemu-img snapshot -a`` on a copy (which also takes the snapshot's own disk size).
:func:`rewrite_snapshot_table` writes a new table at the end of a file, for the hostile names
and offsets no tool produces.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import trio

from tests.support.images import create, qemu_img, qemu_io
from vdiskfs.block.context import open_image
from vdiskfs.drivers.format.qcow2 import Qcow2Node

__all__ = ["KINDS", "NAMES", "applied_reference", "make_snapshot_image", "rewrite_snapshot_table",
           "snapshot_l1_tables", "snapshot_reference"]

KiB, MiB = 1 << 10, 1 << 20
NAMES = ("first", "second", "third")
#: Image variants: v3, v2 (compat=0.10), extended L2 entries, compressed clusters (converted
#: with -c before the snapshots), and a snapshot taken before a resize.
KINDS = ("v3", "v2", "l2ext", "compressed", "resized")
SIZE = 4 * MiB

#: Writes before each snapshot (and after the last): each overwrites part of the previous
#: state, crosses cluster boundaries, zeroes and discards.
_STEPS = (
    ("write -P 0x11 0 1M", "write -P 0x12 2M 640k"),
    ("write -P 0x21 512k 1M", "write -z 2M 64k", "write -P 0x22 3M 5k"),
    ("discard 0 256k", "write -P 0x31 700k 300k", "write -P 0x32 3584k 512k"),
    ("write -P 0x41 0 4M",),
)


def make_snapshot_image(directory: Path, kind: str, name: str = "disk.qcow2") -> Path:
    """A 4 MiB qcow2 of variant ``kind`` with snapshots :data:`NAMES`, then overwritten."""
    path = directory / name
    options: dict[str, object] = {"cluster_size": 65536}
    if kind == "v2":
        options["compat"] = "0.10"
    elif kind == "l2ext":
        options.update(extended_l2=True, cluster_size=32768)
    if kind == "compressed":
        source = create(directory / "source.qcow2", SIZE, **options)
        qemu_io(source, "write -P 0x05 0 3M")
        qemu_img("convert", "-c", "-O", "qcow2", source, path)
        source.unlink()
    else:
        create(path, SIZE, **options)
    for number, steps in enumerate(_STEPS):
        qemu_io(path, *steps)
        if number < len(NAMES):
            qemu_img("snapshot", "-c", NAMES[number], path)
            if kind == "resized" and number == 0:
                # "first" keeps 4 MiB; the others and the current state see 6 MiB.
                qemu_img("resize", "-q", path, str(6 * MiB))
    if kind == "resized":
        qemu_io(path, "write -P 0x51 5M 512k")
    return path


def snapshot_reference(image: Path, snapshot: str, out: Path) -> Path:
    """``qemu-img convert -l snapshot.name=NAME -O raw``: QEMU's bytes of the snapshot (at the
    image's current size, which is the snapshot's unless it was resized since)."""
    qemu_img("convert", "-l", f"snapshot.name={snapshot}", "-O", "raw", image, out)
    return out


def applied_reference(image: Path, snapshot: str, out: Path) -> Path:
    """The guest disk after ``qemu-img snapshot -a`` on a copy: the snapshot at its own size."""
    copy = out.with_suffix(".applied.qcow2")
    shutil.copyfile(image, copy)
    qemu_img("snapshot", "-a", snapshot, copy)
    qemu_img("convert", "-O", "raw", copy, out)
    copy.unlink()
    return out


_ENTRY = struct.Struct(">QIHHIIQII")


def snapshot_l1_tables(image: Path) -> list[tuple[int, int]]:
    """``(l1_table_offset, l1_size)`` of each snapshot (from a sync caller, outside trio)."""

    async def read() -> list[tuple[int, int]]:
        node = await open_image(str(image))
        assert isinstance(node, Qcow2Node)
        await node.aclose()
        return [(s.l1_table_offset, s.l1_size) for s in node.snapshots]

    return trio.run(read)


def rewrite_snapshot_table(path: Path, entries: list[tuple[str | bytes, str | bytes, int, int]],
                           *, table_offset: int | None = None, count: int | None = None) -> None:
    """Write a snapshot table of ``(id, name, l1_table_offset, l1_size)`` entries (16 bytes of
    extra data: no VM state, the image's size) at the cluster-aligned end of the file, and
    point the header at it (or at ``table_offset``, claiming ``count`` entries)."""
    data = bytearray(path.read_bytes())
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    disk_size = struct.unpack_from(">Q", data, 24)[0]
    table = bytearray()
    for ident, name, l1_offset, l1_size in entries:
        raw_id = ident.encode() if isinstance(ident, str) else ident
        raw_name = name.encode() if isinstance(name, str) else name
        table += _ENTRY.pack(l1_offset, l1_size, len(raw_id), len(raw_name), 1_700_000_000, 0,
                             0, 0, 16)
        table += struct.pack(">QQ", 0, disk_size) + raw_id + raw_name
        table += bytes(-len(table) % 8)
    cluster = 1 << cluster_bits
    offset = -(-len(data) // cluster) * cluster
    data += bytes(offset - len(data)) + table + bytes(-len(table) % cluster)
    struct.pack_into(">IQ", data, 60, len(entries) if count is None else count,
                     offset if table_offset is None else table_offset)
    path.write_bytes(bytes(data))
