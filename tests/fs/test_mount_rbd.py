"""``vdiskfs mount rbd:...``: a qcow2 kept in an RBD image of the throwaway cluster mounted
through the real command line, written with ``--rw`` and checked by QEMU's rbd driver; an
image and its snapshot side by side."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from tests.support.ceph import Cluster
from tests.support.images import create, qemu_img, qemu_io, reference_raw, run
from tests.support.mount import mounted, vdiskfs
from tests.support.partitioned import make_gpt_disk

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


def test_mount_shows_rbd_snapshots_as_files(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``rbd:pool/img`` shows ``img@SNAP.raw`` for each RBD snapshot, read-only, with its
    partitions and stats, as a qcow2's internal snapshots appear; ``info`` names the files;
    ``--no-snapshots`` and ``--rw`` leave them out, ``--snapshots`` brings them back."""
    disk = make_gpt_disk(tmp_path)
    ceph_cluster.rbd("import", disk.path, "rbd/snapdisk")
    ceph_cluster.rbd("snap", "create", "rbd/snapdisk@installed")
    head = ceph_cluster.qemu_name("rbd/snapdisk")
    # The current state loses its partition table; the snapshot keeps it.
    qemu_io(head, "write -z 0 32M", fmt="raw")
    info = json.loads(vdiskfs("info", "--json", "--format", "raw", head).stdout)
    assert [(s["name"], s["mount-file"]) for s in info["snapshots"]] == [
        ("installed", "snapdisk@installed.raw")]
    with mounted(head, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        files = sorted(os.listdir(mnt))
        assert files == ["snapdisk.raw", "snapdisk@installed-part1.raw",
                         "snapdisk@installed-part2.raw", "snapdisk@installed-part3.raw",
                         "snapdisk@installed.raw", "stats"]
        snap = mnt / "snapdisk@installed.raw"
        assert snap.read_bytes() == disk.path.read_bytes()
        assert (mnt / "snapdisk.raw").read_bytes() == bytes(32 << 20)
        assert os.stat(snap).st_mode & 0o777 == 0o444
        with pytest.raises(OSError, match="Read-only file system"):
            snap.open("r+b")
        tree = (mnt / "stats" / "snapdisk@installed" / "tree").read_text()
        assert "rbd:rbd/snapdisk@installed:" in tree and "cache" in tree
        assert (mnt / "stats" / "snapdisk@installed-part1").is_dir()
    with mounted(head, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--no-snapshots")) as mnt:
        assert sorted(os.listdir(mnt)) == ["snapdisk.raw", "stats"]
    with mounted(head, mountpoint=tmp_path / "mnt", options=("--format", "raw", "--rw")) as mnt:
        assert sorted(os.listdir(mnt)) == ["snapdisk.raw", "stats"]
    with mounted(head, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--rw", "--snapshots")) as mnt:
        snap = mnt / "snapdisk@installed.raw"
        assert "snapdisk@installed.raw" in os.listdir(mnt)
        assert os.stat(snap).st_mode & 0o777 == 0o444
        with pytest.raises(OSError) as refused:
            snap.open("r+b")
        assert refused.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
        assert snap.read_bytes() == disk.path.read_bytes()


def test_mount_image_and_its_snapshot_by_name(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``IMAGE`` and ``IMAGE@SNAP`` named both: the named snapshot is ``IMAGE@SNAP.raw``, so
    the image's own view of it goes by its ID; both keep the old bytes."""
    ceph_cluster.rbd("create", "--size", "4M", "rbd/mount-snap")
    head = ceph_cluster.qemu_name("rbd/mount-snap")
    qemu_io(head, "write -P 0x01 0 4M", fmt="raw")
    ceph_cluster.rbd("snap", "create", "rbd/mount-snap@old")
    qemu_io(head, "write -P 0x02 0 1M", fmt="raw")
    snap = ceph_cluster.qemu_name("rbd/mount-snap@old")
    (listed,) = json.loads(ceph_cluster.rbd("snap", "ls", "--format", "json",
                                            "rbd/mount-snap"))
    by_id = f"mount-snap@{listed['id']}.raw"
    with mounted(head, snap, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw")) as mnt:
        assert sorted(os.listdir(mnt)) == sorted(
            ["mount-snap.raw", "mount-snap@old.raw", by_id, "stats"])
        assert (mnt / "mount-snap@old.raw").read_bytes() == b"\x01" * (4 << 20)
        assert (mnt / by_id).read_bytes() == b"\x01" * (4 << 20)
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
