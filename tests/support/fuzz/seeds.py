"""The seed corpus: small, valid image trees of every format, built with the test builders.

Every seed is a directory holding one image tree -- the image and whatever it names (backing
files, data files, extents, parents) -- so that a mutated copy of the directory is a case. The
trees are kept small (a few MiB of virtual disk, mostly under 1 MiB of file) so that a case is
copied, opened and read through in a few tens of milliseconds.

qemu-img writes fresh UUIDs and timestamps into some formats, so two corpora built from the
same code differ in those bytes; the mutations chosen for a case depend only on its seed
number and the structure of the image, not on those bytes.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support import qcow2_images as q
from tests.support import vhdx_build as vb
from tests.support.images import create, qemu_img, qemu_io, random_bytes, write_pattern_file
from tests.support.partitioned import GptEntry, boot_record, build_gpt, mbr_entry, put
from tests.support.vmdk_images import build_stream_optimized, make_vmdk
from tests.support.vpc_images import Block, Locator, VhdSpec, build_vhd, make_vhd

__all__ = ["FORMATS", "Seed", "build_corpus"]

KiB = 1024
MiB = 1024 * KiB

#: Formats a campaign visits in turn. ``raw`` covers the partition tables (MBR, EBR chains,
#: GPT, hybrid MBR), which ``info`` scans on every format.
FORMATS = ("qcow2", "qed", "vdi", "vmdk", "vpc", "vhdx", "raw")


@dataclass(frozen=True)
class Seed:
    """One valid image tree: ``directory / image`` is what a case opens."""

    format: str
    name: str
    directory: Path
    image: str


# -- qcow2 -----------------------------------------------------------------------------------------

_QCOW2_RECIPES = ("v2", "v3", "cluster_512", "refcount_1", "chain_3", "chain_raw_base",
                  "zlib_write", "extended_l2", "data_file", "snapshots_v2", "odd_size", "empty")


def _qcow2(name: str) -> Callable[[Path], str]:
    def build(d: Path) -> str:
        return q.RECIPES[name].build(d).relative_to(d).as_posix()
    return build


# -- qed, vdi --------------------------------------------------------------------------------------


def _qed(d: Path) -> str:
    image = create(d / "disk.qed", 2 * MiB, "qed", cluster_size=64 * KiB)
    qemu_io(image, "write -P 0x11 0 100k", "write -P 0x22 1500k 64k", fmt="qed")
    return image.name


def _qed_backing(d: Path) -> str:
    write_pattern_file(d / "base.raw", 21, 1 * MiB)
    image = create(d / "top.qed", 1 * MiB, "qed", backing="base.raw", backing_fmt="raw")
    qemu_io(image, "write -P 0x33 64k 64k", fmt="qed")
    return image.name


def _vdi(static: bool) -> Callable[[Path], str]:
    def build(d: Path) -> str:
        image = create(d / "disk.vdi", 2 * MiB, "vdi", static=static)
        qemu_io(image, "write -P 0x44 0 1200k", "write -P 0x55 1900k 10k", fmt="vdi")
        return image.name
    return build


# -- vmdk ------------------------------------------------------------------------------------------


def _vmdk(subformat: str) -> Callable[[Path], str]:
    def build(d: Path) -> str:
        image = make_vmdk(d / "disk.vmdk", 2 * MiB, subformat,
                          io=("write -P 0x66 0 130k", "write -P 0x77 1900k 20k"))
        return image.name
    return build


def _vmdk_stream(d: Path) -> str:
    data = random_bytes(31, 300 * KiB) + bytes(400 * KiB) + random_bytes(32, 50 * KiB)
    return build_stream_optimized(d / "stream.vmdk", data, grain_sectors=128).name


def _vmdk_converted_stream(d: Path) -> str:
    source = write_pattern_file(d / "source.raw", 33, 512 * KiB)
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source,
             d / "conv.vmdk")
    source.unlink()
    return "conv.vmdk"


def _vmdk_child(d: Path) -> str:
    make_vmdk(d / "base.vmdk", 1 * MiB, io=("write -P 0x12 0 1M",))
    create(d / "child.vmdk", 1 * MiB, "vmdk", backing="base.vmdk", backing_fmt="vmdk")
    qemu_io(d / "child.vmdk", "write -P 0x34 128k 64k", fmt="vmdk")
    return "child.vmdk"


# -- vpc -------------------------------------------------------------------------------------------


def _vpc(subformat: str) -> Callable[[Path], str]:
    def build(d: Path) -> str:
        image = make_vhd(d / "disk.vhd", 2 * MiB, subformat, force_size=True,
                         io=("write -P 0x21 0 70k", "write -P 0x43 1800k 8k"))
        return image.name
    return build


_VHD_BLOCK = 64 * KiB


def _vpc_differencing(locators: list[Locator], parent_name: str = "") -> Callable[[Path], str]:
    def build(d: Path) -> str:
        parent_uuid = uuid.UUID(int=0x1234)
        build_vhd(d / "parent.vhd", VhdSpec(size=MiB, block_size=_VHD_BLOCK,
                                            disk_uuid=parent_uuid),
                  {1: Block(random_bytes(41, _VHD_BLOCK))})
        build_vhd(d / "child.vhd", VhdSpec(size=MiB, block_size=_VHD_BLOCK, disk_type=4,
                                           parent_uuid=parent_uuid, parent_name=parent_name,
                                           locators=locators),
                  {0: Block(random_bytes(42, _VHD_BLOCK), sectors={0, 5, 127}),
                   3: Block(random_bytes(43, _VHD_BLOCK))})
        return "child.vhd"
    return build


# -- vhdx ------------------------------------------------------------------------------------------


def _vhdx(subformat: str) -> Callable[[Path], str]:
    def build(d: Path) -> str:
        image = create(d / "disk.vhdx", 4 * MiB, "vhdx", subformat=subformat, block_size="1M",
                       log_size="1M")
        qemu_io(image, "write -P 0x31 0 1200k", "write -P 0x32 3M 4k", fmt="vhdx")
        return image.name
    return build


def _vhdx_differencing(d: Path) -> str:
    parent = create(d / "parent.vhdx", 2 * MiB, "vhdx", block_size="1M", log_size="1M")
    qemu_io(parent, "write -P 0x51 1M 1M", fmt="vhdx")
    guid = vb.read_layout(parent).data_write_guid
    spec = vb.DiffSpec(virtual_size=2 * MiB, states={0: vb.PARTIALLY_PRESENT},
                       blocks={0: random_bytes(51, MiB)},
                       sectors={0: {0, 1, 7, 2047}},
                       locator={"parent_linkage": "{" + str(guid) + "}",
                                "relative_path": "parent.vhdx"})
    vb.build_differencing(d / "child.vhdx", spec)
    return "child.vhdx"


def _vhdx_dirty_log(d: Path) -> str:
    path, _ = vb.dirty_log_image(d)
    for extra in ("replayed.vhdx", "replayed.raw"):
        (d / extra).unlink(missing_ok=True)
    return path.name


# -- raw with partition tables ---------------------------------------------------------------------

_DISK = 2 * MiB
_SECTORS = _DISK // 512


def _raw_plain(d: Path) -> str:
    write_pattern_file(d / "plain.raw", 61, 512 * KiB)
    return "plain.raw"


def _raw_gpt(d: Path) -> str:
    disk = build_gpt(_DISK, [GptEntry(0, 34, 1000, name="first"),
                             GptEntry(1, 1001, 2047, name="second"),
                             GptEntry(5, 3000, _SECTORS - 40, name="sixth")])
    (d / "gpt.img").write_bytes(bytes(disk))
    return "gpt.img"


def _raw_gpt_4k(d: Path) -> str:
    disk = build_gpt(4 * MiB, [GptEntry(0, 6, 200), GptEntry(1, 201, 900)], sector_size=4096,
                     entry_count=32)
    (d / "gpt4k.img").write_bytes(bytes(disk))
    return "gpt4k.img"


def _raw_mbr(d: Path) -> str:
    """Two primaries and an extended partition with a chain of three logical ones."""
    disk = bytearray(_DISK)
    put(disk, 0, boot_record(mbr_entry(0x83, 1, 200, boot=0x80), mbr_entry(0x0C, 201, 300),
                             mbr_entry(0x05, 600, 2000), disk_signature=0x1234ABCD))
    # EBRs: each holds its logical partition (relative to itself) and a link (relative to
    # the extended partition's start).
    for i, at in enumerate((600, 1000, 1500)):
        link = mbr_entry(0x05, (1000, 1500)[i] - 600, 400) if i < 2 else None
        put(disk, at * 512, boot_record(mbr_entry(0x83, 10, 300), link))
    (d / "mbr.img").write_bytes(bytes(disk))
    return "mbr.img"


def _raw_hybrid(d: Path) -> str:
    entries = [GptEntry(0, 64, 1000), GptEntry(1, 1100, 3000)]
    mbr = boot_record(mbr_entry(0xEE, 1, 63), mbr_entry(0x83, 64, 937))
    disk = build_gpt(_DISK, entries, mbr=mbr)
    (d / "hybrid.img").write_bytes(bytes(disk))
    return "hybrid.img"


def _qcow2_with_gpt(d: Path) -> str:
    """A GPT inside a qcow2: the partition scan reads through the format layer."""
    table = d / "table.raw"
    table.write_bytes(bytes(build_gpt(_DISK, [GptEntry(0, 34, 2000)])))
    qemu_img("convert", "-O", "qcow2", table, d / "disk.qcow2")
    table.unlink()
    return "disk.qcow2"


_BUILDERS: dict[str, dict[str, Callable[[Path], str]]] = {
    "qcow2": {**{name: _qcow2(name) for name in _QCOW2_RECIPES}, "gpt": _qcow2_with_gpt},
    "qed": {"plain": _qed, "backing": _qed_backing},
    "vdi": {"dynamic": _vdi(False), "static": _vdi(True)},
    "vmdk": {
        "sparse": _vmdk("monolithicSparse"),
        "flat": _vmdk("monolithicFlat"),
        "split-sparse": _vmdk("twoGbMaxExtentSparse"),
        "stream": _vmdk_stream,
        "stream-qemu": _vmdk_converted_stream,
        "child": _vmdk_child,
    },
    "vpc": {
        "dynamic": _vpc("dynamic"),
        "fixed": _vpc("fixed"),
        "diff-w2ru": _vpc_differencing([
            Locator(b"W2ku", "C:\\vms\\parent.vhd".encode("utf-16-le")),
            Locator(b"W2ru", ".\\parent.vhd".encode("utf-16-le"))]),
        "diff-macx": _vpc_differencing([Locator(b"MacX", b"file://localhost/x/parent.vhd"),
                                        Locator(b"Wi2r", b".\\parent.vhd")]),
        "diff-name": _vpc_differencing([], "parent.vhd"),
    },
    "vhdx": {
        "dynamic": _vhdx("dynamic"),
        "fixed": _vhdx("fixed"),
        "differencing": _vhdx_differencing,
        "dirty-log": _vhdx_dirty_log,
    },
    "raw": {
        "plain": _raw_plain,
        "gpt": _raw_gpt,
        "gpt-4k": _raw_gpt_4k,
        "mbr-ebr": _raw_mbr,
        "hybrid": _raw_hybrid,
    },
}


def build_corpus(root: Path, formats: tuple[str, ...] = FORMATS) -> dict[str, list[Seed]]:
    """Build (or reuse, when ``root`` already has it) every seed of ``formats``."""
    corpus: dict[str, list[Seed]] = {}
    for fmt in formats:
        seeds = []
        for name, build in _BUILDERS[fmt].items():
            directory = root / fmt / name
            marker = directory / ".seed-image"
            if not marker.exists():
                if directory.exists():
                    shutil.rmtree(directory)
                directory.mkdir(parents=True)
                image = build(directory)
                _drop_build_leftovers(directory, image)
                marker.write_text(image)
            seeds.append(Seed(fmt, name, directory, marker.read_text()))
        corpus[fmt] = seeds
    return corpus


def _drop_build_leftovers(directory: Path, image: str) -> None:
    """The qemu-io source files (``src-*.bin``) are not part of the tree."""
    for leftover in directory.glob("src-*.bin"):
        leftover.unlink()
    for leftover in ("text.bin", "source.raw"):
        path = directory / leftover
        if path.exists() and leftover != image:
            path.unlink()
