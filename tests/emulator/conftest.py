"""Fixtures for the boot tests: skip without a usable /dev/kvm, build the guest once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.emulator.guest import RootDisk, build_kernel, build_rootfs, kvm_usable


@pytest.fixture(scope="session")
def guest_kernel() -> Path:
    if not kvm_usable():
        pytest.skip("needs a usable /dev/kvm")
    if not shutil.which("sgdisk") or not shutil.which("mkfs.ext4"):
        pytest.skip("needs sgdisk and mkfs.ext4")
    return build_kernel()


@pytest.fixture(scope="session")
def root_disk_template(guest_kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> RootDisk:
    return build_rootfs(tmp_path_factory.mktemp("rootfs") / "root.img")


@pytest.fixture
def root_disk(root_disk_template: RootDisk, tmp_path: Path) -> RootDisk:
    """A private copy of the test disk (tests write to it)."""
    path = tmp_path / "root.raw"
    shutil.copyfile(root_disk_template.path, path)
    return RootDisk(path, root_disk_template.data_md5, root_disk_template.data_offset)


@pytest.fixture(scope="session")
def modules_kernel(guest_kernel: Path) -> Path:
    """The test kernel's "modules" variant (virtio_mmio, virtio_blk as modules); its modules
    are under ``modules_kernel.parent / "modules"``."""
    return build_kernel(modules=True)
