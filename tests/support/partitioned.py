"""Partitioned test disks: real ones built with the reference tools, and hand-built tables.

Recipes (``make_gpt_disk``, ``make_mbr_disk``, ``make_gpt_4k_disk``, ``make_mbr_4k_disk``,
``make_sgdisk_gpt_disk``) build a small raw disk in a directory with ``sfdisk``, ``sgdisk`` or
``fdisk``, put file systems with known files on some partitions (``mkfs.ext4 -d``,
``mkfs.vfat`` + ``mcopy``), and return a :class:`PartitionedDisk` saying what each partition
holds. The partition table expectations come from the tools (:func:`reference_partitions`:
``sfdisk --json``, or ``fdisk -b 4096 -l`` for 4096-byte sectors; :func:`sgdisk_info`), never
from the parser under test. Mount tests reuse the recipes and convert the disk to other formats
with ``qemu-img convert``.

The builders below them (:func:`mbr_entry`, :func:`boot_record`, :func:`build_gpt`...) write
tables byte by byte, for the hostile cases no tool will produce, and :class:`MemoryNode` serves
such bytes as a block node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.images import random_bytes, run
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, Buffer, NodeKind
from vdiskfs.partitions import Partition, PartitionTable, open_window, read_partition_table

MiB = 1 << 20
SFDISK = shutil.which("sfdisk") or "sfdisk"
SGDISK = shutil.which("sgdisk") or "sgdisk"
FDISK = shutil.which("fdisk") or "fdisk"
MKFS_EXT4 = shutil.which("mkfs.ext4") or "mkfs.ext4"
MKFS_VFAT = shutil.which("mkfs.vfat") or "mkfs.vfat"

LINUX_FS_GUID = "0fc63daf-8483-4772-8e79-3d69d8477de4"
EFI_SYSTEM_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
DISK_GUID = "11111111-2222-3333-4444-555555555555"
MBR_DISK_ID = 0x1234ABCD


# -- real disks, built with the reference tools --------------------------------------------------


@dataclass(frozen=True)
class PartitionContents:
    """What one partition of a recipe holds."""

    number: int
    #: ``"ext4"``, ``"vfat"``, or ``None`` for a partition left empty (zeros).
    fstype: str | None
    #: Path inside the file system (``/``-separated, no leading slash) -> contents.
    files: dict[str, bytes] = field(default_factory=dict)
    #: File system label (``mount -L``-able), ``""`` when none.
    label: str = ""


@dataclass(frozen=True)
class PartitionedDisk:
    """A raw disk built by a recipe."""

    path: Path
    scheme: str
    sector_size: int
    size: int
    #: By partition number; only data partitions (no extended container).
    contents: dict[int, PartitionContents]


@dataclass(frozen=True)
class ReferencePartition:
    """A partition as the reference tool reports it, in bytes, types in our spelling."""

    number: int
    start: int
    size: int
    #: ``"0x83"`` (MBR) or the lowercase type GUID (GPT).
    type: str
    name: str = ""
    uuid: str = ""
    bootable: bool = False


def ext4_files(seed: int) -> dict[str, bytes]:
    return {
        "hello.txt": b"hello from ext4\n",
        "dir/data.bin": random_bytes(seed, 100_000),
        "dir/sub/empty": b"",
    }


def vfat_files(seed: int) -> dict[str, bytes]:
    return {
        "hello.txt": b"hello from vfat\r\n",
        "docs/data.bin": random_bytes(seed, 70_000),
    }


def make_ext4(path: Path, size: int, files: dict[str, bytes], label: str, *,
              uuid: str | None = None, links: dict[str, str] | None = None,
              options: Sequence[str] = ()) -> Path:
    """An ext4 image of ``size`` bytes holding ``files`` and symbolic ``links`` (name ->
    target) (``mkfs.ext4 -d``), no root needed; ``uuid`` sets the file system's UUID,
    ``options`` go to mkfs (``-t ext2``, ``-b 4096``)."""
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for name, data in files.items():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    for name, link in (links or {}).items():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(link)
    run(MKFS_EXT4, "-q", "-F", "-L", label, "-E", "root_owner=0:0",
        *(("-U", uuid) if uuid else ()), *options, "-d", tree, path, f"{size // 1024}k")
    shutil.rmtree(tree)
    return path


def make_vfat(path: Path, size: int, files: dict[str, bytes], label: str) -> Path:
    """A FAT image of ``size`` bytes holding ``files`` (``mkfs.vfat`` + ``mmd``/``mcopy``)."""
    path.unlink(missing_ok=True)
    run(MKFS_VFAT, "-C", "-n", label, path, str(size // 1024))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    made: set[str] = set()
    staging = path.with_suffix(".file")
    for name, data in files.items():
        parts = name.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                _mtools(env, "mmd", "-i", path, f"::/{directory}")
                made.add(directory)
        staging.write_bytes(data)
        _mtools(env, "mcopy", "-i", path, staging, f"::/{name}")
    staging.unlink(missing_ok=True)
    return path


def _mtools(env: dict[str, str], *args: str | os.PathLike[str]) -> None:
    cmd = [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


def _write_at(disk: Path, offset: int, image: Path) -> None:
    with open(disk, "r+b") as out, open(image, "rb") as src:
        out.seek(offset)
        shutil.copyfileobj(src, out)
    image.unlink()


def _new_disk(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _sfdisk_script(disk: Path, lines: Sequence[str]) -> None:
    proc = subprocess.run([SFDISK, "-q", str(disk)], input="\n".join(lines) + "\n",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"sfdisk failed:\n{proc.stdout}\n{proc.stderr}")


def make_gpt_disk(directory: str | os.PathLike[str], name: str = "gpt.img") -> PartitionedDisk:
    """A 32 MiB GPT disk (``sfdisk``): 1 ext4 "root" (12 MiB at 1 MiB), 2 vfat "EFI System"
    (8 MiB, legacy-BIOS-bootable attribute), 3 empty Linux filesystem "empty" (4 MiB)."""
    directory = Path(directory)
    disk = _new_disk(directory / name, 32 * MiB)
    _sfdisk_script(disk, [
        "label: gpt",
        f"label-id: {DISK_GUID}",
        "unit: sectors",
        "",
        f'start=2048, size=24576, type={LINUX_FS_GUID}, name="root"',
        f'size=16384, type={EFI_SYSTEM_GUID}, name="EFI System", attrs="LegacyBIOSBootable"',
        f'size=8192, type={LINUX_FS_GUID}, name="empty"',
    ])
    ref = {p.number: p for p in reference_partitions(disk)}
    root = ext4_files(1)
    esp = vfat_files(2)
    _write_at(disk, ref[1].start, make_ext4(directory / f"{name}.p1", ref[1].size, root, "root"))
    _write_at(disk, ref[2].start, make_vfat(directory / f"{name}.p2", ref[2].size, esp, "ESP"))
    return PartitionedDisk(disk, "gpt", 512, 32 * MiB, {
        1: PartitionContents(1, "ext4", root, "root"),
        2: PartitionContents(2, "vfat", esp, "ESP"),
        3: PartitionContents(3, None),
    })


def make_sgdisk_gpt_disk(directory: str | os.PathLike[str],
                         name: str = "sgdisk.img") -> PartitionedDisk:
    """A 16 MiB GPT disk written by ``sgdisk`` (a second writer, tables only): entries 1
    "BIOS boot" (1 MiB), 3 "data" (4 MiB) and 4 (2 MiB, no name) -- entry 2 unused -- in a
    table of 128 entries. ``sgdisk`` waits a second for the kernel after writing."""
    directory = Path(directory)
    disk = _new_disk(directory / name, 16 * MiB)
    run(SGDISK, "-o", "-U", DISK_GUID,
        "-n", "1:2048:+1M", "-t", "1:ef02", "-c", "1:BIOS boot",
        "-n", "3:0:+4M", "-t", "3:8300", "-c", "3:data", "-A", "3:set:2",
        "-n", "4:0:+2M", "-t", "4:8200",
        disk)
    return PartitionedDisk(disk, "gpt", 512, 16 * MiB, {
        1: PartitionContents(1, None), 3: PartitionContents(3, None),
        4: PartitionContents(4, None),
    })


def make_mbr_disk(directory: str | os.PathLike[str], name: str = "mbr.img") -> PartitionedDisk:
    """A 32 MiB MBR disk (``sfdisk``): 1 vfat (0x0c, bootable, 8 MiB), 2 empty Linux (4 MiB),
    3 extended holding 5 ext4 (0x83, 8 MiB) and 6 empty Linux swap (0x82, 4 MiB)."""
    directory = Path(directory)
    disk = _new_disk(directory / name, 32 * MiB)
    _sfdisk_script(disk, [
        "label: dos",
        f"label-id: 0x{MBR_DISK_ID:08x}",
        "unit: sectors",
        "",
        "start=2048, size=16384, type=c, bootable",
        "start=18432, size=8192, type=83",
        "start=26624, size=34816, type=5",
        "start=28672, size=16384, type=83",
        "start=47104, size=8192, type=82",
    ])
    ref = {p.number: p for p in reference_partitions(disk)}
    boot = vfat_files(3)
    data = ext4_files(4)
    _write_at(disk, ref[1].start, make_vfat(directory / f"{name}.p1", ref[1].size, boot, "BOOT"))
    _write_at(disk, ref[5].start, make_ext4(directory / f"{name}.p5", ref[5].size, data, "data"))
    return PartitionedDisk(disk, "mbr", 512, 32 * MiB, {
        1: PartitionContents(1, "vfat", boot, "BOOT"),
        2: PartitionContents(2, None),
        5: PartitionContents(5, "ext4", data, "data"),
        6: PartitionContents(6, None),
    })


@dataclass(frozen=True)
class FsSpec:
    """One partition of :func:`make_linux_disk`: ``kind`` ``"ext4"`` (``files``, symbolic
    ``links``, ``uuid``), ``"vfat"`` (``files``) or ``"empty"`` (zeros)."""

    kind: str = "ext4"
    files: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    uuid: str | None = None
    size: int = 8 * MiB
    #: More mkfs.ext4 options.
    options: tuple[str, ...] = ()


def _make_fs(path: Path, spec: FsSpec, label: str) -> Path | None:
    if spec.kind == "ext4":
        return make_ext4(path, spec.size, spec.files, label, uuid=spec.uuid, links=spec.links,
                         options=spec.options)
    if spec.kind == "vfat":
        return make_vfat(path, spec.size, spec.files, label)
    return None


def make_linux_disk(path: Path, specs: Sequence[FsSpec], *, table: bool = True) -> Path:
    """A raw disk with a GPT (``sfdisk``) whose partitions 1, 2... hold ``specs`` in order;
    ``table=False``: the one file system of ``specs`` is the whole disk."""
    if not table:
        (spec,) = specs
        image = _make_fs(path, spec, "disk")
        assert image is not None
        return image
    size = MiB + sum(s.size for s in specs) + MiB
    disk = _new_disk(path, size)
    _sfdisk_script(disk, ["label: gpt", "unit: sectors", ""] + [
        f"{'start=2048, ' if i == 0 else ''}size={s.size // 512}, type={LINUX_FS_GUID}"
        for i, s in enumerate(specs)])
    ref = {p.number: p for p in reference_partitions(disk)}
    for number, spec in enumerate(specs, 1):
        image = _make_fs(path.with_name(f"{path.name}.p{number}"), spec, f"part{number}")
        if image is not None:
            _write_at(disk, ref[number].start, image)
    return disk


def _fdisk_script(disk: Path, sector_size: int, commands: Sequence[str]) -> None:
    proc = subprocess.run([FDISK, "-b", str(sector_size), str(disk)],
                          input="\n".join(commands) + "\n", capture_output=True, text=True)
    if proc.returncode != 0 or "altered" not in proc.stdout:
        raise AssertionError(f"fdisk failed:\n{proc.stdout}\n{proc.stderr}")


def make_gpt_4k_disk(directory: str | os.PathLike[str],
                     name: str = "gpt4k.img") -> PartitionedDisk:
    """A 32 MiB GPT disk with 4096-byte logical sectors (``fdisk -b 4096``): 1 ext4
    "linux data" (8 MiB at 1 MiB), 2 empty "esp" of type EFI System (4 MiB)."""
    directory = Path(directory)
    disk = _new_disk(directory / name, 32 * MiB)
    _fdisk_script(disk, 4096, [
        "g", "n", "1", "256", "+8M", "n", "2", "", "+4M", "t", "2", "1",
        "x", "n", "1", "linux data", "n", "2", "esp", "i", DISK_GUID, "r", "w",
    ])
    ref = {p.number: p for p in reference_partitions(disk, sector_size=4096)}
    data = ext4_files(5)
    _write_at(disk, ref[1].start, make_ext4(directory / f"{name}.p1", ref[1].size, data, "4k"))
    return PartitionedDisk(disk, "gpt", 4096, 32 * MiB, {
        1: PartitionContents(1, "ext4", data, "4k"),
        2: PartitionContents(2, None),
    })


def make_mbr_4k_disk(directory: str | os.PathLike[str],
                     name: str = "mbr4k.img") -> PartitionedDisk:
    """A 32 MiB MBR disk with 4096-byte logical sectors (``fdisk -b 4096``): 1 Linux (8 MiB),
    2 extended holding 5 Linux (4 MiB). Tables only; an MBR does not record its sector size,
    so it reads right only with ``sector_size=4096``."""
    directory = Path(directory)
    disk = _new_disk(directory / name, 32 * MiB)
    _fdisk_script(disk, 4096, [
        "o", "n", "p", "1", "256", "+8M", "n", "e", "2", "", "", "n", "l", "", "+4M", "w",
    ])
    return PartitionedDisk(disk, "mbr", 4096, 32 * MiB, {1: PartitionContents(1, None),
                                                         5: PartitionContents(5, None)})


def _number(node: str, disk: Path) -> int:
    suffix = node[len(str(disk)):] if node.startswith(str(disk)) else node
    match = re.search(r"(\d+)$", suffix)
    if match is None:
        raise AssertionError(f"cannot number partition node {node!r}")
    return int(match.group(1))


def reference_partitions(disk: str | os.PathLike[str],
                         sector_size: int = 512) -> list[ReferencePartition]:
    """The partitions as util-linux sees them: ``sfdisk --json`` for 512-byte sectors, else
    ``fdisk -b SIZE -l``. The MBR extended container is listed with its whole extent."""
    disk = Path(disk)
    if sector_size == 512:
        return _sfdisk_reference(disk)
    return _fdisk_reference(disk, sector_size)


def _sfdisk_reference(disk: Path) -> list[ReferencePartition]:
    table = json.loads(run(SFDISK, "--json", disk).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    gpt = table["label"] == "gpt"
    out = []
    for entry in table["partitions"]:
        out.append(ReferencePartition(
            number=_number(entry["node"], disk),
            start=entry["start"] * sector,
            size=entry["size"] * sector,
            type=entry["type"].lower() if gpt else f"0x{int(entry['type'], 16):02x}",
            name=entry.get("name", ""),
            uuid=entry.get("uuid", "").lower(),
            bootable=bool(entry.get("bootable", False)),
        ))
    return out


def _fdisk_reference(disk: Path, sector_size: int) -> list[ReferencePartition]:
    label = run(FDISK, "-b", str(sector_size), "-l", disk).stdout
    gpt = "Disklabel type: gpt" in label
    columns = "Device,Start,Sectors,Type-UUID,UUID,Name" if gpt else "Device,Start,Sectors,Id"
    listing = run(FDISK, "-b", str(sector_size), "-l", "-o", columns, disk).stdout
    out = []
    rows = listing.split("\nDevice", 1)[1].splitlines()[1:]
    for row in rows:
        if not row.strip():
            continue
        fields = row.split(None, 5 if gpt else 4)
        start, sectors = int(fields[1]) * sector_size, int(fields[2]) * sector_size
        if gpt:
            out.append(ReferencePartition(
                _number(fields[0], disk), start, sectors, fields[3].lower(),
                name=fields[5] if len(fields) > 5 else "", uuid=fields[4].lower()))
        else:
            out.append(ReferencePartition(_number(fields[0], disk), start, sectors,
                                          f"0x{int(fields[3], 16):02x}"))
    return out


def sgdisk_info(disk: str | os.PathLike[str], number: int) -> dict[str, str]:
    """``sgdisk -i N``: its "Key: value" lines."""
    info = {}
    for line in run(SGDISK, "-i", str(number), disk).stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            info[key.strip()] = value.strip()
    return info


# -- hand-built tables ---------------------------------------------------------------------------


def mbr_entry(type_byte: int, start_lba: int, sectors: int, *, boot: int = 0) -> bytes:
    """One 16-byte MBR/EBR entry (CHS fields left as 0xfe 0xff 0xff: "use LBA")."""
    return struct.pack("<B3sB3sII", boot, b"\xfe\xff\xff", type_byte, b"\xfe\xff\xff",
                       start_lba, sectors)


def boot_record(*entries: bytes | None, disk_signature: int = 0,
                signature: bytes = b"\x55\xaa") -> bytes:
    """A 512-byte MBR or EBR with up to four entries (``None``: an empty slot)."""
    if len(entries) > 4:
        raise ValueError("a boot record has four slots")
    sector = bytearray(512)
    struct.pack_into("<I", sector, 440, disk_signature)
    for slot, entry in enumerate(entries):
        if entry is not None:
            sector[446 + 16 * slot : 446 + 16 * (slot + 1)] = entry
    sector[510:512] = signature
    return bytes(sector)


def put(disk: bytearray, offset: int, data: bytes) -> bytearray:
    disk[offset : offset + len(data)] = data
    return disk


def guid_bytes(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


@dataclass(frozen=True)
class GptEntry:
    """One entry of a hand-built GPT; ``index`` is its 0-based slot (partition ``index + 1``)."""

    index: int
    first_lba: int
    last_lba: int
    type_guid: str = LINUX_FS_GUID
    unique_guid: str = ""
    name: str = ""
    attributes: int = 0

    def pack(self, entry_size: int = 128) -> bytes:
        unique = self.unique_guid or f"00000000-0000-4000-8000-{self.index + 1:012x}"
        name = self.name.encode("utf-16-le")[:72].ljust(72, b"\0")
        raw = struct.pack("<16s16sQQQ72s", guid_bytes(self.type_guid), guid_bytes(unique),
                          self.first_lba, self.last_lba, self.attributes, name)
        return raw.ljust(entry_size, b"\0")


def gpt_header(*, my_lba: int, alternate_lba: int, first_usable_lba: int, last_usable_lba: int,
               entries_lba: int, entry_count: int, entries_crc32: int, entry_size: int = 128,
               disk_guid: str = DISK_GUID, header_size: int = 92, revision: int = 0x00010000,
               sector_size: int = 512, header_crc32: int | None = None) -> bytes:
    """A GPT header sector; its CRC32 is computed unless ``header_crc32`` is given."""
    sector = bytearray(sector_size)
    struct.pack_into("<8sIIIIQQQQ16sQIII", sector, 0, b"EFI PART", revision, header_size, 0, 0,
                     my_lba, alternate_lba, first_usable_lba, last_usable_lba,
                     guid_bytes(disk_guid), entries_lba, entry_count, entry_size, entries_crc32)
    if header_crc32 is None:
        header_crc32 = zlib.crc32(bytes(sector[: min(header_size, sector_size)]))
    struct.pack_into("<I", sector, 16, header_crc32)
    return bytes(sector)


def protective_mbr(disk_sectors: int, *extra: bytes | None) -> bytes:
    """A protective MBR (slot 1: type 0xee from LBA 1); ``extra`` entries make it hybrid."""
    size = min(disk_sectors - 1, 0xFFFFFFFF)
    return boot_record(mbr_entry(0xEE, 1, size), *extra)


def build_gpt(disk_size: int, entries: Sequence[GptEntry], *, sector_size: int = 512,
              entry_count: int = 128, entry_size: int = 128, disk_guid: str = DISK_GUID,
              mbr: bytes | None = None, backup: bool = True) -> bytearray:
    """A whole disk with a protective MBR, primary and backup GPT, as ``sgdisk`` lays them out."""
    disk = bytearray(disk_size)
    sectors = disk_size // sector_size
    last_lba = sectors - 1
    array = bytearray(entry_count * entry_size)
    for entry in entries:
        array[entry.index * entry_size : (entry.index + 1) * entry_size] = entry.pack(entry_size)
    array_sectors = -(-len(array) // sector_size)
    crc = zlib.crc32(bytes(array))
    first_usable, last_usable = 2 + array_sectors, last_lba - array_sectors - 1
    common = dict(first_usable_lba=first_usable, last_usable_lba=last_usable,
                  entry_count=entry_count, entry_size=entry_size, entries_crc32=crc,
                  disk_guid=disk_guid, sector_size=sector_size)
    put(disk, 0, mbr if mbr is not None else protective_mbr(sectors))
    put(disk, sector_size, gpt_header(my_lba=1, alternate_lba=last_lba, entries_lba=2, **common))
    put(disk, 2 * sector_size, bytes(array))
    if backup:
        backup_array_lba = last_lba - array_sectors
        put(disk, backup_array_lba * sector_size, bytes(array))
        put(disk, last_lba * sector_size,
            gpt_header(my_lba=last_lba, alternate_lba=1, entries_lba=backup_array_lba, **common))
    return disk


class MemoryNode(BlockNode):
    """Bytes in memory as a read-only protocol node, for hand-built disks."""

    driver = "memory"
    kind = NodeKind.PROTOCOL

    def __init__(self, data: bytes | bytearray, label: str = "mem.img") -> None:
        super().__init__(read_only=True, label=label)
        self.data = bytes(data)
        self.size = len(self.data)

    async def _pread(self, offset: int, length: int) -> Buffer:
        return self.data[offset : offset + length]


async def scan_bytes(data: bytes | bytearray, **options: Any) -> PartitionTable:
    """``read_partition_table`` of a hand-built disk held in memory."""
    return await read_partition_table(MemoryNode(data), **options)


async def scan_image(path: str | os.PathLike[str], **options: Any) -> PartitionTable:
    """``read_partition_table`` of a raw disk file, opened (and closed) through the registry."""
    node = await open_image(str(path), OpenOptions(format="raw"))
    try:
        return await read_partition_table(node, **options)
    finally:
        await node.aclose()


def layout(table: PartitionTable, unit: int = 512) -> list[tuple[int, int, int]]:
    """``(number, start, size)`` of each partition in ``unit``s, for compact expectations."""
    return [(p.number, p.start // unit, p.size // unit) for p in table.partitions]


async def read_window(path: str | os.PathLike[str], part: Partition, offset: int,
                      length: int) -> bytes:
    """Bytes of a partition of a raw disk file, read through the window the FUSE layer builds
    for it (:func:`vdiskfs.partitions.open_window`)."""
    disk = await open_image(str(path), OpenOptions(format="raw"))
    try:
        window = await open_window(disk, part)
        try:
            return bytes(await window.pread(offset, length))
        finally:
            await window.aclose()
    finally:
        await disk.aclose()
