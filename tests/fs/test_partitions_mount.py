"""Partition files through the real mount, for every format that can hold a partitioned disk:
each equals its slice of ``qemu-img convert -O raw``, and the file systems inside mount."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.images import qemu_img, reference_raw
from tests.support.mount import loop_device, loop_mounted, mounted, vdiskfs
from tests.support.partitioned import PartitionedDisk, make_gpt_disk, make_mbr_disk
from vdiskfs.block.registry import driver_names

pytestmark = pytest.mark.mount

FORMATS = ["raw", "qcow2", "vmdk"]
KERNEL_FILESYSTEMS = {
    line.split()[-1] for line in Path("/proc/filesystems").read_text().splitlines()
}


def _kernel_parses_gpt() -> bool:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return "CONFIG_EFI_PARTITION=y" in f.read()
    except OSError:
        return True  # unknown: try it


def _mtools_read(image: Path, name: str) -> bytes:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(["mcopy", "-n", "-i", str(image), f"::{name}", "-"], check=True,
                          capture_output=True, env=env).stdout


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PartitionedDisk]:
    base = tmp_path_factory.mktemp("partitioned")
    return {"gpt": make_gpt_disk(base), "mbr": make_mbr_disk(base)}


def _convert(disk: PartitionedDisk, fmt: str, directory: Path) -> Path:
    if fmt not in driver_names():
        pytest.skip(f"no {fmt} driver yet")
    if fmt == "raw":
        return disk.path
    out = directory / f"{disk.path.stem}.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, disk.path, out)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scheme", ["gpt", "mbr"])
def test_partition_files_match_reference(disks: dict[str, PartitionedDisk], scheme: str,
                                         fmt: str, tmp_path: Path) -> None:
    disk = disks[scheme]
    image = _convert(disk, fmt, tmp_path)
    reference = reference_raw(image, tmp_path / "ref.raw").read_bytes()
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk.path)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--format", fmt)) as mnt:
        stem = image.stem
        names = sorted(os.listdir(mnt))
        for part in table["partitions"]:
            number = int(part["node"].rsplit("img", 1)[1])
            assert f"{stem}-part{number}.raw" in names
            if part["type"] in ("5", "f", "85"):  # extended: 1 KiB, as /dev shows it
                continue
            start, size = part["start"] * 512, part["size"] * 512
            data = (mnt / f"{stem}-part{number}.raw").read_bytes()
            assert len(data) == size
            assert data == reference[start : start + size], f"partition {number}"
            stats = json.loads((mnt / "stats" / f"{stem}-part{number}" / "0-offset").read_text())
            assert stats["rd_bytes"] >= size


@pytest.mark.parametrize("fmt", ["qcow2"])
@pytest.mark.parametrize("scheme", ["gpt", "mbr"])
def test_file_systems_inside_partitions_mount(disks: dict[str, PartitionedDisk], scheme: str,
                                              fmt: str, tmp_path: Path) -> None:
    disk = disks[scheme]
    image = _convert(disk, fmt, tmp_path)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--format", fmt)) as mnt:
        for number, contents in disk.contents.items():
            if contents.fstype is None:
                continue
            part = mnt / f"{image.stem}-part{number}.raw"
            if contents.fstype not in KERNEL_FILESYSTEMS:
                # This host kernel lacks the driver (vfat here): read with mtools instead,
                # still a real FAT implementation reading our partition file.
                for name, data in contents.files.items():
                    assert _mtools_read(part, name) == data, f"{number}:{name}"
                continue
            with loop_mounted(part, tmp_path / f"fs{number}") as fs:
                for name, data in contents.files.items():
                    assert (fs / name).read_bytes() == data, f"{number}:{name}"


@pytest.mark.skipif(not _kernel_parses_gpt(), reason="host kernel built without EFI_PARTITION")
def test_losetup_partscan_on_whole_disk(disks: dict[str, PartitionedDisk],
                                        tmp_path: Path) -> None:
    disk = disks["gpt"]
    with (
        mounted(disk.path, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt,
        loop_device(mnt / f"{disk.path.stem}.raw", partscan=True) as device,
    ):
        # The kernel's own partition scan of our file, read from sysfs (no udev needed).
        base = Path("/sys/class/block") / os.path.basename(device)
        sectors = {n: int((base / f"{base.name}p{n}" / "size").read_text()) for n in (1, 2, 3)}
        assert sectors == {1: 24576, 2: 16384, 3: 8192}


def test_no_partitions_hides_them(disks: dict[str, PartitionedDisk], tmp_path: Path) -> None:
    disk = disks["mbr"]
    with mounted(disk.path, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--no-partitions")) as mnt:
        assert sorted(os.listdir(mnt)) == [f"{disk.path.stem}.raw", "stats"]


def test_info_lists_partitions(disks: dict[str, PartitionedDisk]) -> None:
    disk = disks["gpt"]
    info = json.loads(vdiskfs("info", "--json", "--format", "raw", disk.path).stdout)
    entries = info["partitions"]["entries"]
    assert info["partitions"]["scheme"] == "gpt"
    assert [(p["number"], p["name"]) for p in entries] == [(1, "root"), (2, "EFI System"),
                                                         (3, "empty")]
    assert entries[0]["start"] == 2048 * 512 and entries[0]["size"] == 24576 * 512
    text = vdiskfs("info", "--format", "raw", disk.path).stdout
    assert "Partition table: gpt" in text and "'EFI System'" in text
