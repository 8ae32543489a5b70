"""Debian's stock cloud kernel in a cloud image, booted as a user would: ``vdiskfs boot --disk
IMAGE`` with no ``--kernel``. The image (scripts/guest/build-cloud-image.sh) holds the kernel
of ``linux-image-cloud-amd64`` (fetch-cloud-kernel.sh), the initramfs that
build-stock-initramfs.sh makes from the same .deb, and a grub.cfg booting it ``quiet``, as
Debian's does.

Opt-in: ``VDISKFS_STOCK_BOOT=1``. Where /dev/kvm is the emulated kvm_pvm the boot takes about
15 minutes (emulator/NOTES.md), three quarters of the suite's budget, so the suite leaves it
out; on hardware KVM it takes seconds."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.emulator.guest import GUEST_SCRIPTS, boot, kvm_usable

pytestmark = [
    pytest.mark.boot,
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("VDISKFS_STOCK_BOOT"),
                       reason="set VDISKFS_STOCK_BOOT=1: about 15 minutes where KVM is emulated"),
]


def _script(name: str, *args: str, **env: str) -> str:
    proc = subprocess.run([str(GUEST_SCRIPTS / name), *args], capture_output=True, text=True,
                          env={**os.environ, **env})
    if proc.returncode != 0:
        pytest.skip(f"{name}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def test_stock_cloud_image_boots_without_kernel(tmp_path: Path) -> None:
    if not kvm_usable():
        pytest.skip("needs a usable /dev/kvm")
    kernel_dir = Path(_script("fetch-cloud-kernel.sh").strip().splitlines()[-1]).parent
    deb = _script("fetch-cloud-kernel.sh", "--deb").strip().splitlines()[-1]
    initrd = _script("build-stock-initramfs.sh", deb).strip().splitlines()[-1]
    image = tmp_path / "cloud.qcow2"
    built = dict(re.findall(r"^(\w+)=(\S+)$",
                            _script("build-cloud-image.sh", str(image), str(kernel_dir),
                                    "quiet vdiskfs.md5dev=/dev/vda2", INITRD=initrd), re.M))
    result = boot("--memory", "128M", "--disk", f"{image},overlay={tmp_path / 'run.qcow2'}",
                  "--append", f"vdiskfs.md5={built['data_md5']}", stats=tmp_path / "s.json",
                  timeout=2400)
    err, out = result.stderr, result.output
    version = built["kernel_version"]
    assert f"/boot/vmlinuz-{version}" in err and f"/boot/initrd.img-{version}" in err, err
    # The initramfs loaded virtio_blk, which found the disk through ACPI and read its GPT.
    assert re.search(r"vdiskfs-initramfs: modules loaded; block devices: vda vda1 vda2", out), \
        out[-3000:]
    assert "vdiskfs-initramfs: switching root to /sbin/init" in out, out[-3000:]
    assert result.returncode == 0, err + out[-3000:]
    assert "VDISKFS-GUEST: init running" in out
    assert f"VDISKFS-GUEST: md5 ok /dev/vda2 {built['data_md5']}" in out, out[-3000:]
    assert result.stats is not None
    milestones = result.stats["vm"]["console_milestones_s"]
    assert milestones["initramfs_switch_root"] < milestones["user_space"]
