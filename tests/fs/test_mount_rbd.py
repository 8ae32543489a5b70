"""``vdiskfs mount rbd:...``: a qcow2 kept in an RBD image of the throwaway cluster mounted
through the real command line, written with ``--rw`` and checked by QEMU's rbd driver; an
image and its snapshot side by side."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.ceph import Cluster
from tests.support.images import create, qemu_img, qemu_io, reference_raw, run
from tests.support.mount import mounted, vdiskfs

pytestmark = [pytest.mark.mount, pytest.mark.ceph]


def test_mount_qcow2_in_rbd_read_and_write(ceph_cluster: Cluster, tmp_path: Path) -> None:
    source = create(tmp_path / "vm.qcow2", "32M")
    qemu_io(source, "write -P 0x61 0 1M", "write -P 0x62 17M 64k", fmt="qcow2")
    ceph_cluster.rbd("import", source, "rbd/mount-vm")
    ceph_cluster.rbd("resize", "--size", "8M", "rbd/mount-vm")  # room for new clusters
    name = ceph_cluster.qemu_name("rbd/mount-vm")
    reference = reference_raw(source, tmp_path / "ref.raw", fmt="qcow2")
    info = vdiskfs("info", name).stdout
    assert "file format: qcow2" in info and "virtual size: 32 MiB" in info
    with mounted(name, mountpoint=tmp_path / "mnt", options=("--rw",)) as mnt:
        assert sorted(os.listdir(mnt)) == ["mount-vm.raw", "stats"]
        disk = mnt / "mount-vm.raw"
        assert disk.read_bytes() == reference.read_bytes()
        tree = (mnt / "stats" / "mount-vm" / "tree").read_text()
        assert "qcow2" in tree and "rbd" in tree
        fd = os.open(disk, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x77" * 8192, 5 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
    qemu_io(reference, "write -P 0x77 5M 8k", fmt="raw")
    run("qemu-img", "check", "-f", "qcow2", name)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", name, reference)


def test_mount_image_and_its_snapshot(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``IMAGE.raw`` and ``IMAGE@SNAP.raw`` in one mount: the snapshot keeps the old bytes."""
    ceph_cluster.rbd("create", "--size", "4M", "rbd/mount-snap")
    head = ceph_cluster.qemu_name("rbd/mount-snap")
    qemu_io(head, "write -P 0x01 0 4M", fmt="raw")
    ceph_cluster.rbd("snap", "create", "rbd/mount-snap@old")
    qemu_io(head, "write -P 0x02 0 1M", fmt="raw")
    snap = ceph_cluster.qemu_name("rbd/mount-snap@old")
    with mounted(head, snap, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw")) as mnt:
        assert sorted(os.listdir(mnt)) == ["mount-snap.raw", "mount-snap@old.raw", "stats"]
        assert (mnt / "mount-snap@old.raw").read_bytes() == b"\x01" * (4 << 20)
        assert (mnt / "mount-snap.raw").read_bytes()[: 1 << 20] == b"\x02" * (1 << 20)


def test_create_and_overlay_over_an_rbd_base(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``vdiskfs create -b rbd:...`` and ``mount --overlay NEW.qcow2 rbd:...``: the name
    recorded as the backing file as given; writes go to the local overlay, the RBD image
    stays as it was."""
    ceph_cluster.rbd("create", "--size", "4M", "rbd/mount-base")
    base = ceph_cluster.qemu_name("rbd/mount-base")
    qemu_io(base, "write -P 0x33 0 4M", fmt="raw")
    created = tmp_path / "created.qcow2"
    vdiskfs("create", "-f", "qcow2", "-b", base, "-F", "raw", created)
    assert json.loads(qemu_img("info", "--output=json", created))["backing-filename"] == base
    overlay = tmp_path / "top.qcow2"
    with mounted(base, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--overlay", str(overlay))) as mnt:
        fd = os.open(mnt / "mount-base.raw", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x44" * 4096, 1 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert json.loads(qemu_img("info", "--output=json", overlay))["backing-filename"] == base
    run("qemu-img", "check", overlay)
    view = reference_raw(overlay, tmp_path / "view.raw", fmt="qcow2").read_bytes()
    assert view[1 << 20 : (1 << 20) + 4096] == b"\x44" * 4096
    assert view[:4096] == b"\x33" * 4096
    assert reference_raw(base, tmp_path / "base.raw", fmt="raw").read_bytes() == (
        b"\x33" * (4 << 20))
