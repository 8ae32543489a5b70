"""The initramfs for kernels whose virtio drivers are modules (scripts/guest/
build-stock-initramfs.sh, its /init scripts/guest/initramfs-init.sh): what it refuses on the
host, how its /init reads PARTUUIDs (run on the host with busybox), and one boot of the test
kernel's "modules" variant through it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.emulator.guest import BOOT_TIMEOUT, GUEST_SCRIPTS, RootDisk, boot

BUILDER = GUEST_SCRIPTS / "build-stock-initramfs.sh"
BUSYBOX = "/bin/busybox"

needs_busybox = pytest.mark.skipif(not os.access(BUSYBOX, os.X_OK), reason="needs busybox")


def _build(source: Path | str, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUILDER), str(source), str(out)], capture_output=True, text=True,
                          env={**os.environ, **env})


def _init_partuuid(disk: Path, number: int) -> subprocess.CompletedProcess[str]:
    """The initramfs's /init, sourced by busybox sh on the host, on the PARTUUID of partition
    NUMBER of DISK."""
    script = GUEST_SCRIPTS / "initramfs-init.sh"
    return subprocess.run(
        [BUSYBOX, "sh", "-c", f'. "{script}"; partuuid_of "$1" "$2" && echo "$partuuid"', "sh",
         str(disk), str(number)],
        capture_output=True, text=True, env={"VDISKFS_INITRAMFS_LIB": "1", "PATH": "/bin"})


def _blkid_partuuid(disk: Path, number: int) -> str:
    """util-linux's answer: what the kernel matches root=PARTUUID= against."""
    table = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                           check=True).stdout
    part = json.loads(table)["partitiontable"]["partitions"][number - 1]
    if "uuid" in part:
        return part["uuid"].lower()
    label_id = json.loads(table)["partitiontable"]["id"]
    return f"{int(label_id, 16):08x}-{number:02x}"


@needs_busybox
@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_init_reads_partuuids_as_the_kernel(label: str, tmp_path: Path) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk")
    disk = tmp_path / f"{label}.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    layout = f"label: {label}\n" + ("label-id: 0x12ABCDEF\n" if label == "dos" else "")
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout + ",2M\n,2M\n,2M\n", text=True,
                   check=True)
    for number in (1, 3):
        proc = _init_partuuid(disk, number)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == _blkid_partuuid(disk, number)


@needs_busybox
def test_init_finds_no_partuuid_on_a_disk_without_a_table(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4096))
    proc = _init_partuuid(blank, 1)
    assert proc.returncode == 1 and proc.stdout == ""


def _missing(tmp: Path) -> Path:
    return tmp / "missing.deb"


def _not_a_deb(tmp: Path) -> Path:
    path = tmp / "text.deb"
    path.write_text("not a package\n")
    return path


def _modules_of(tmp: Path, *versions: str) -> Path:
    """A tree with lib/modules/<version>/kernel/ for each version, and no module in it."""
    root = tmp / "tree"
    root.mkdir()
    for version in versions:
        (root / "lib" / "modules" / version / "kernel").mkdir(parents=True)
    return root


@pytest.mark.parametrize("make_source, message", [
    (_missing, "no such file or directory"),
    (_not_a_deb, "not a .deb (dpkg-deb cannot read it)"),
    (lambda tmp: _modules_of(tmp), "no lib/modules/<version>/ in it"),
    (lambda tmp: _modules_of(tmp, "1.0", "2.0"), "modules of several kernels"),
    (lambda tmp: _modules_of(tmp, "9.9"), "kernel 9.9 has no module virtio_mmio"),
])
def test_builder_refuses_what_is_not_a_kernels_modules(
        make_source: Callable[[Path], Path], message: str, tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb")
    out = tmp_path / "out.cpio"
    proc = _build(make_source(tmp_path), out, VDISKFS_CACHE=str(tmp_path / "cache"))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.boot
@pytest.mark.slow
def test_modules_kernel_boots_through_its_initramfs(modules_kernel: Path,
                                                   root_disk: RootDisk,
                                                   tmp_path: Path) -> None:
    """The test kernel with virtio_mmio and virtio_blk as modules: the initramfs built from its
    own modules loads them, finds root=PARTUUID= on a qcow2 served by the stack, mounts it
    read-write and switch_roots to its /sbin/init, which md5sums the data partition, writes a
    file and powers off."""
    initramfs = _build(modules_kernel.parent / "modules", tmp_path / "initramfs.cpio")
    assert initramfs.returncode == 0, initramfs.stderr
    qcow2 = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(root_disk.path),
                    str(qcow2)], check=True)
    partuuid = _blkid_partuuid(root_disk.path, 1)
    result = boot(
        "--kernel", str(modules_kernel), "--memory", "64M",
        "--initrd", str(tmp_path / "initramfs.cpio"),
        "--disk", f"{qcow2},format=qcow2",
        "--append", f"root=PARTUUID={partuuid.upper()} rw vdiskfs.md5dev=/dev/vda2 "
                    f"vdiskfs.md5={root_disk.data_md5}",
        # Twice the usual deadline: the initramfs's steps run in the emulated kernel's user space.
        stats=tmp_path / "stats.json", timeout=2 * BOOT_TIMEOUT,
    )
    out = result.output
    for line in ("vdiskfs-initramfs: virtio_mmio loaded", "vdiskfs-initramfs: virtio_blk loaded",
                 f"vdiskfs-initramfs: found root /dev/vda1 (root=PARTUUID={partuuid.upper()})",
                 "vdiskfs-initramfs: mounted root /dev/vda1 rw",
                 "vdiskfs-initramfs: switching root to /sbin/init",
                 "VDISKFS-GUEST: init running as pid 1"):
        assert line in out, out[-4000:]
    assert result.returncode == 0, result.stderr + out[-3000:]
    assert f"VDISKFS-GUEST: md5 ok /dev/vda2 {root_disk.data_md5}" in out, out[-3000:]
    assert "VDISKFS-GUEST: wrote /vdiskfs-guest-was-here" in out, out[-3000:]
    assert result.stats is not None
    milestones = result.stats["vm"]["console_milestones_s"]
    assert {"initramfs_modules_loaded", "devices_found", "partitions_read",
            "initramfs_switch_root", "user_space"} <= set(milestones)
