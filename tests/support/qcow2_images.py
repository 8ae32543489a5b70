"""Recipes for the qcow2 test images, built at test time with qemu-img and qemu-io.

Each recipe builds one image (and whatever backing or data files it needs) in an empty directory
and returns the path of the image to open. Together they cover every feature the qcow2 driver
reads: versions 2 and 3, cluster sizes from 512 B to 2 MiB, refcount widths, backing chains with
relative names and backing format extensions, zlib and zstd compressed clusters, zero clusters,
extended L2 entries, external data files, internal snapshots, odd virtual sizes, backing files
shorter than their overlay.

Guest data comes from small random files (``qemu-io write -s``), one per write, so that a run
read from the wrong place never matches by accident. :class:`Qcow2Images` builds each recipe
once per test session, with QEMU's view of it (``qemu-img convert -O raw``) as the reference.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.hostile import patch, set_bits
from tests.support.images import (
    QEMU_IMG,
    QEMU_IO,
    create,
    qemu_img,
    qemu_io,
    write_pattern_file,
)

KiB = 1024
MiB = 1024 * KiB

#: Header offsets used to patch images (docs/interop/qcow2.txt).
SIZE_OFFSET = 24
INCOMPATIBLE_FEATURES_OFFSET = 72


class _Writes:
    """qemu-io commands writing fresh random data, one source file per write."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.seed = seed
        self.count = 0

    def data(self, offset: int, length: int, *, compressed: bool = False) -> str:
        self.count += 1
        source = self.directory / f"src-{self.seed}-{self.count}.bin"
        write_pattern_file(source, self.seed * 1000 + self.count, length)
        flags = "-c " if compressed else ""
        return f"write -q {flags}-s {source} {offset} {length}"

    def scatter(self, cluster: int, size: int) -> list[str]:
        """Writes that make every shape of mapping: multi-cluster contiguous runs, clusters
        allocated in reverse host order, unaligned and boundary-straddling pieces, the tail."""
        wanted = [
            (0, 3 * cluster + 123),
            (7 * cluster, cluster),
            (6 * cluster, cluster),
            (10 * cluster + 100, 777),
            (12 * cluster - 300, 600),
            (size - 1000, 1000),
        ]
        return [self.data(offset, length) for offset, length in wanted if offset + length <= size]


def _compressible(seed: int, length: int) -> bytes:
    """Text-like bytes that deflate well, with a random block every so often."""
    import random

    rng = random.Random(seed)
    out = bytearray()
    while len(out) < length:
        if rng.random() < 0.2:
            out += rng.randbytes(4096)
        else:
            out += bytes(rng.choice(b"qcow2 ") for _ in range(512)) * 8
    return bytes(out[:length])


# -- recipes -------------------------------------------------------------------------------------


def _plain(directory: Path, *, size: int = 4 * MiB, cluster: int = 64 * KiB,
           **options: Any) -> Path:
    image = create(directory / "disk.qcow2", size, cluster_size=cluster, **options)
    qemu_io(image, *_Writes(directory, 1).scatter(cluster, size))
    return image


def v2(d: Path) -> Path:
    return _plain(d, compat="0.10")


def v3(d: Path) -> Path:
    image = _plain(d)
    qemu_io(
        image,
        "write -q -z 3584k 64k",  # unallocated -> zero cluster (plain)
        "write -q -z 64k 64k",  # data -> zero cluster keeping its allocation
        "write -q -z -u 128k 64k",  # data -> unmapped zero cluster
        "write -q -z 2000k 8k",  # partial cluster: zeroes written as data
    )
    return image


def cluster_512(d: Path) -> Path:
    # 64 entries per L2 table: 1 MiB of guest crosses 32 of them, 400 KiB of data fills 13.
    image = _plain(d, size=1 * MiB, cluster=512)
    qemu_io(image, _Writes(d, 18).data(300 * KiB, 400 * KiB))
    return image


def cluster_4k(d: Path) -> Path:
    image = _plain(d, size=5 * MiB, cluster=4 * KiB)
    qemu_io(image, "write -q -z 4k 8k")
    return image


def cluster_2m(d: Path) -> Path:
    return _plain(d, size=32 * MiB, cluster=2 * MiB)


def refcount_1(d: Path) -> Path:
    return _plain(d, refcount_bits=1)


def refcount_64(d: Path) -> Path:
    return _plain(d, refcount_bits=64, cluster=4 * KiB)


def chain_3(d: Path) -> Path:
    """top.qcow2 -> mid/mid.qcow2 -> base/base.qcow2, every name relative, formats recorded."""
    (d / "base").mkdir()
    (d / "mid").mkdir()
    writes = _Writes(d, 2)
    base = create(d / "base" / "base.qcow2", 4 * MiB)
    qemu_io(base, *writes.scatter(64 * KiB, 4 * MiB), writes.data(1 * MiB, 2 * MiB))
    mid = create(d / "mid" / "mid.qcow2", 4 * MiB, backing="../base/base.qcow2",
                 backing_fmt="qcow2", cluster_size=4 * KiB)
    qemu_io(mid, writes.data(1 * MiB + 4000, 300 * KiB), "write -q -z 2500k 64k")
    top = create(d / "top.qcow2", 4 * MiB, backing="mid/mid.qcow2", backing_fmt="qcow2")
    qemu_io(top, writes.data(1200 * KiB, 100 * KiB), writes.data(3 * MiB, 64 * KiB))
    return top


def chain_raw_base(d: Path) -> Path:
    """A v2 overlay over a raw base (backing format extension ``raw``)."""
    write_pattern_file(d / "base.raw", 3, 2 * MiB)
    top = create(d / "top.qcow2", 2 * MiB, backing="base.raw", backing_fmt="raw",
                 compat="0.10")
    qemu_io(top, *_Writes(d, 3).scatter(64 * KiB, 2 * MiB))
    return top


def backing_probed(d: Path) -> Path:
    """An overlay without the backing format extension: the backing file's format is probed."""
    base = create(d / "base.qcow2", 1 * MiB)
    qemu_io(base, _Writes(d, 4).data(0, 1 * MiB))
    top = create(d / "top.qcow2", 1 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, _Writes(d, 5).data(100 * KiB, 10 * KiB))
    data = top.read_bytes()
    magic = struct.pack(">I", 0xE2792ACA)
    at = data.index(magic, 104)
    patch(top, at, ">I", 0x7F00F00D)  # an unknown (ignored) extension now
    return top


def backing_shorter(d: Path) -> Path:
    """A 1 MiB backing file under a 3 MiB overlay with writes straddling the backing's end."""
    base = create(d / "base.qcow2", 1 * MiB)
    writes = _Writes(d, 6)
    qemu_io(base, writes.data(0, 1 * MiB))
    top = create(d / "top.qcow2", 3 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, writes.data(1 * MiB - 5000, 10000), writes.data(2 * MiB, 4096))
    return top


def _compressed_source(d: Path, size: int) -> Path:
    source = d / "source.raw"
    source.write_bytes(_compressible(7, size - 200 * KiB) + bytes(100 * KiB)
                       + _compressible(8, 100 * KiB))
    return source


def zlib_convert(d: Path) -> Path:
    image = d / "disk.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", _compressed_source(d, 3 * MiB), image)
    return image


def zlib_convert_4k(d: Path) -> Path:
    image = d / "disk.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k",
             _compressed_source(d, 1 * MiB), image)
    return image


def zstd_convert(d: Path) -> Path:
    image = d / "disk.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
             _compressed_source(d, 3 * MiB), image)
    return image


def _compressed_writes(d: Path, **options: Any) -> Path:
    """``write -c`` leaves descriptors whose last sector runs past the end of the file and
    neighbours sharing a sector; a later plain write over part of one copies it on write."""
    image = create(d / "disk.qcow2", 2 * MiB, **options)
    source = d / "text.bin"
    for cluster in range(4):
        source.write_bytes(_compressible(20 + cluster, 64 * KiB))
        qemu_io(image, f"write -q -c -s {source} {cluster * 64 * KiB} 64k")
    qemu_io(image, _Writes(d, 9).data(2 * 64 * KiB + 1000, 3000))
    return image


def zlib_write(d: Path) -> Path:
    return _compressed_writes(d)


def zstd_write(d: Path) -> Path:
    return _compressed_writes(d, compression_type="zstd")


def extended_l2(d: Path) -> Path:
    """Subclusters of 2 KiB: allocated, zero and unallocated ones side by side, and a
    compressed cluster (compressed clusters have no subclusters)."""
    image = create(d / "disk.qcow2", 4 * MiB, extended_l2=True)
    writes = _Writes(d, 10)
    source = d / "text.bin"
    source.write_bytes(_compressible(30, 64 * KiB))
    qemu_io(
        image,
        writes.data(4 * KiB, 2 * KiB),
        writes.data(10 * KiB + 5, 3000),
        "write -q -z 20k 4k",
        writes.data(64 * KiB, 128 * KiB),
        "write -q -z 130k 2k",
        writes.data(256 * KiB + 62 * KiB, 4 * KiB),  # the end of one cluster, start of next
        f"write -q -c -s {source} 1m 64k",
        "write -q -z 2m 64k",
        writes.data(4 * MiB - 2048, 2048),
    )
    return image


def extended_l2_backing(d: Path) -> Path:
    """Extended L2 over a backing file: unallocated subclusters of allocated clusters read the
    backing file."""
    base = create(d / "base.qcow2", 2 * MiB)
    writes = _Writes(d, 11)
    qemu_io(base, writes.data(0, 2 * MiB))
    top = create(d / "top.qcow2", 2 * MiB, extended_l2=True, cluster_size=32 * KiB,
                 backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(
        top,
        writes.data(4 * KiB, 1 * KiB),
        writes.data(9 * KiB, 7 * KiB),
        "write -q -z 40k 2k",
        writes.data(100 * KiB, 100 * KiB),
        "write -q -z 1m 32k",
    )
    return top


def _in_dir(directory: Path, *args: str | Path) -> str:
    """Run a QEMU tool in ``directory``: QEMU 7.2 resolves a relative external data file name
    against the working directory (vdiskfs, like QEMU for backing files, against the image's
    directory), so the two agree only when they are the same."""
    proc = subprocess.run([str(a) for a in args], cwd=directory, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed in {directory}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _data_file(d: Path, seed: int, *options: str) -> Path:
    _in_dir(d, QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
            ",".join(("data_file=disk.data", *options)), "disk.qcow2", str(4 * MiB))
    commands = [*_Writes(d, seed).scatter(64 * KiB, 4 * MiB), "write -q -z 64k 64k"]
    _in_dir(d, QEMU_IO, *[arg for command in commands for arg in ("-c", command)], "disk.qcow2")
    return d / "disk.qcow2"


def data_file(d: Path) -> Path:
    return _data_file(d, 12)


def data_file_raw(d: Path) -> Path:
    return _data_file(d, 13, "data_file_raw=on")


def snapshots(d: Path) -> Path:
    """Two internal snapshots, with writes after each so the active state differs from both."""
    image = create(d / "disk.qcow2", 4 * MiB)
    writes = _Writes(d, 14)
    qemu_io(image, *writes.scatter(64 * KiB, 4 * MiB))
    qemu_img("snapshot", "-c", "first", image)
    qemu_io(image, writes.data(0, 100 * KiB), "write -q -z 3m 64k")
    qemu_img("snapshot", "-c", "second", image)
    qemu_io(image, writes.data(50 * KiB, 200 * KiB), "write -q -z -u 448k 64k")
    return image


def snapshots_v2(d: Path) -> Path:
    image = create(d / "disk.qcow2", 2 * MiB, compat="0.10")
    writes = _Writes(d, 15)
    qemu_io(image, writes.data(0, 300 * KiB))
    qemu_img("snapshot", "-c", "only", image)
    qemu_io(image, writes.data(100 * KiB, 300 * KiB))
    return image


def odd_size(d: Path) -> Path:
    """1000000 bytes: qemu-img rounds up to 1000448 (512-byte sectors), not to a cluster."""
    image = create(d / "disk.qcow2", 1_000_000)
    qemu_io(image, _Writes(d, 16).data(1_000_448 - 70_000, 70_000))
    return image


def odd_header_size(d: Path) -> Path:
    """A header size that is not a multiple of 512 (QEMU reads it rounded down)."""
    image = create(d / "disk.qcow2", 1_000_448)
    qemu_io(image, _Writes(d, 17).data(1_000_448 - 70_000, 70_000))
    patch(image, SIZE_OFFSET, ">Q", 1_000_000)
    return image


def dirty(d: Path) -> Path:
    """Lazy refcounts and the dirty bit set, as after a crash: readable as is."""
    image = _plain(d, lazy_refcounts=True)
    set_bits(image, INCOMPATIBLE_FEATURES_OFFSET, ">Q", 1)
    return image


def preallocated(d: Path) -> Path:
    return _plain(d, size=2 * MiB, preallocation="metadata")


def empty(d: Path) -> Path:
    return create(d / "disk.qcow2", 3 * MiB)


@dataclass(frozen=True)
class Recipe:
    build: Callable[[Path], Path]
    #: The image has compressed clusters / a backing file (what the counter checks expect).
    compressed: bool = False
    backing: bool = False


RECIPES: dict[str, Recipe] = {
    "v2": Recipe(v2),
    "v3": Recipe(v3),
    "cluster_512": Recipe(cluster_512),
    "cluster_4k": Recipe(cluster_4k),
    "cluster_2m": Recipe(cluster_2m),
    "refcount_1": Recipe(refcount_1),
    "refcount_64": Recipe(refcount_64),
    "chain_3": Recipe(chain_3, backing=True),
    "chain_raw_base": Recipe(chain_raw_base, backing=True),
    "backing_probed": Recipe(backing_probed, backing=True),
    "backing_shorter": Recipe(backing_shorter, backing=True),
    "zlib_convert": Recipe(zlib_convert, compressed=True),
    "zlib_convert_4k": Recipe(zlib_convert_4k, compressed=True),
    "zstd_convert": Recipe(zstd_convert, compressed=True),
    "zlib_write": Recipe(zlib_write, compressed=True),
    "zstd_write": Recipe(zstd_write, compressed=True),
    "extended_l2": Recipe(extended_l2, compressed=True),
    "extended_l2_backing": Recipe(extended_l2_backing, backing=True),
    "data_file": Recipe(data_file),
    "data_file_raw": Recipe(data_file_raw),
    "snapshots": Recipe(snapshots),
    "snapshots_v2": Recipe(snapshots_v2),
    "odd_size": Recipe(odd_size),
    "odd_header_size": Recipe(odd_header_size),
    "dirty": Recipe(dirty),
    "preallocated": Recipe(preallocated),
    "empty": Recipe(empty),
}


@dataclass(frozen=True)
class BuiltImage:
    name: str
    path: Path
    #: QEMU's guest view of the image.
    reference: bytes

    def qemu_info(self) -> dict[str, Any]:
        """``qemu-img info --output=json`` of the image."""
        return json.loads(_in_dir(self.path.parent, QEMU_IMG, "info", "--output=json",
                                  self.path))

    def qemu_map(self) -> list[dict[str, Any]]:
        """``qemu-img map --output=json`` of the image."""
        return json.loads(_in_dir(self.path.parent, QEMU_IMG, "map", "--output=json",
                                  self.path))


class Qcow2Images:
    """Builds each recipe once, in its own directory under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, BuiltImage] = {}

    def get(self, name: str) -> BuiltImage:
        if name not in self._built:
            directory = self.root / name
            directory.mkdir(parents=True)
            path = RECIPES[name].build(directory).resolve()
            raw = directory / "reference.raw"
            _in_dir(directory, QEMU_IMG, "convert", "-O", "raw", path, raw)
            reference = raw.read_bytes()
            raw.unlink()
            self._built[name] = BuiltImage(name, path, reference)
        return self._built[name]

    def copy(self, name: str, into: Path) -> Path:
        """A private copy of the recipe's directory (image, backing and data files) at
        ``into / name``, for a test that writes; returns the image's path in it."""
        image = self.get(name)
        target = into / name
        shutil.copytree(image.path.parent, target)
        return target / image.path.name
