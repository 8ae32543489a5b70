"""The one boot of ``vdiskfs boot --disk IMAGE`` without ``--kernel``: a GPT qcow2 whose ext4
root holds the test kernel in /boot and a grub.cfg (scripts/guest/build-cloud-image.sh) boots
to the guest's init. What is chosen for other images is checked without booting
(test_find.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.emulator.guest import boot, build_cloud_image

pytestmark = [pytest.mark.boot, pytest.mark.slow]


def test_qcow2_boots_its_own_grub_entry(guest_kernel: Path, tmp_path: Path) -> None:
    image = tmp_path / "cloud.qcow2"
    # The data partition's md5 is known once the disk is built: --append adds it to the
    # grub entry's command line.
    built = build_cloud_image(image, guest_kernel, "vdiskfs.md5dev=/dev/vda2")
    version = built["kernel_version"]
    result = boot("--memory", "64M", "--disk", f"{image},overlay={tmp_path / 'run.qcow2'}",
                  "--append", f"vdiskfs.md5={built['data_md5']}", stats=tmp_path / "s.json")
    err, out = result.stderr, result.output
    kernel = f"{image} partition 1: /boot/vmlinuz-{version}"
    assert (f"vdiskfs boot: booting grub.cfg default entry 'vdiskfs test guest' "
            f"({image} partition 1: /boot/grub/grub.cfg):\n  kernel  {kernel}\n"
            "  initrd  none\n  cmdline root=/dev/vda1 ro vdiskfs.md5dev=/dev/vda2 "
            "console=ttyS0\n") in err, err
    assert "warning" not in err, err
    assert "VFS: Mounted root (ext4 filesystem) readonly on device" in out, out[-3000:]
    assert "Run /sbin/init as init process" in out, out[-3000:]
    assert result.returncode == 0, err + out[-3000:]
    assert "VDISKFS-GUEST: init running" in out
    assert f"VDISKFS-GUEST: md5 ok /dev/vda2 {built['data_md5']}" in out, out[-3000:]
    assert result.stats is not None
    vm = result.stats["vm"]
    assert vm["boot"]["kernel"] == kernel
    assert vm["boot"]["chosen_by"].startswith("grub.cfg default entry 'vdiskfs test guest'")
    assert vm["console_milestones_s"]["run_init"] > 0
    # The kernel and grub.cfg were read through the stack: the qcow2 layer counted them.
    layers = {k: v for k, v in result.stats["cloud"].items() if k.endswith("-qcow2")}
    assert layers and all(v["rd_bytes"] > 1 << 20 for v in layers.values())
