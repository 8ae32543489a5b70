"""``vdiskfs mount rbd:...``: a qcow2 kept in an RBD image of the throwaway cluster mounted
through the real command line, written with ``--rw`` and checked by QEMU's rbd driver; an
image and its snapshot side by side."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.support.ceph import Cluster
from tests.support.images import (
    create,
    qemu_img,
    qemu_io,
    random_bytes,
    reference_raw,
    run,
)
from tests.support.mount import mounted, vdiskfs, write_synced
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
        write_synced(disk, b"\x77" * 8192, 5 << 20)
    qemu_io(reference, "write -P 0x77 5M 8k", fmt="raw")
    run("qemu-img", "check", "-f", "qcow2", name)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", name, reference)


@pytest.mark.slow
def test_mount_shows_rbd_snapshots_as_files(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``rbd:pool/img`` shows ``img@SNAP.raw`` for each RBD snapshot, read-only, with its
    partitions and stats, as a qcow2's internal snapshots appear; ``info`` names the files;
    ``--snapshots`` shows them under ``--rw`` too, still read-only (the defaults and
    ``--no-snapshots`` are the code that tests/fs/test_mount_snapshots.py checks)."""
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
        assert "rbd:rbd/snapdisk@installed:" in tree
        assert (mnt / "stats" / "snapdisk@installed-part1").is_dir()
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
        write_synced(mnt / "mount-base.raw", b"\x44" * 4096, 1 << 20)
    assert json.loads(qemu_img("info", "--output=json", overlay))["backing-filename"] == base
    run("qemu-img", "check", overlay)
    view = reference_raw(overlay, tmp_path / "view.raw", fmt="qcow2").read_bytes()
    assert view[1 << 20 : (1 << 20) + 4096] == b"\x44" * 4096
    assert view[:4096] == b"\x33" * 4096
    assert reference_raw(base, tmp_path / "base.raw", fmt="raw").read_bytes() == (
        b"\x33" * (4 << 20))


def _read_in_thread(path: Path, offset: int, length: int) -> dict[str, object]:
    """``os.pread`` of the file in a thread (the test goes on while it waits): its result
    (``data`` or ``error``) and ``seconds`` appear in the dict when it is done."""
    result: dict[str, object] = {}

    def read() -> None:
        started = time.monotonic()
        fd = os.open(path, os.O_RDONLY)
        try:
            result["data"] = os.pread(fd, length, offset)
        except OSError as exc:
            result["error"] = exc
        finally:
            os.close(fd)
            result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    result["thread"] = thread
    return result


@pytest.mark.slow
def test_stopped_osd_under_a_mount(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """The OSD stopped (SIGSTOP) while a mount reads: a read waits and then returns the right
    bytes once the OSD runs again (an image with a long ``rados_osd_op_timeout``), or fails
    with ETIMEDOUT after the timeout (an image with a short one: 2 s) and later reads succeed. Never
    wrong bytes, never a wait past the timeout."""
    data = random_bytes(31, 8 << 20)
    source = tmp_path / "fault.raw"
    source.write_bytes(data)
    names = []
    for image, timeout in (("fault-patient", 120), ("fault-quick", 2)):
        ceph_cluster.rbd("import", source, f"rbd/{image}")
        names.append(f"{ceph_cluster.qemu_name(f'rbd/{image}')}:rados_osd_op_timeout={timeout}")
    osd = ceph_cluster.processes["osd.0"]
    with mounted(*names, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        patient, quick = mnt / "fault-patient.raw", mnt / "fault-quick.raw"
        osd.send_signal(signal.SIGSTOP)
        try:
            waiting = _read_in_thread(patient, 3 << 20, 1 << 20)
            failing = _read_in_thread(quick, 5 << 20, 1 << 20)
            failing["thread"].join(60)  # type: ignore[attr-defined]
            # The patient reader still waits for the stopped OSD.
            assert waiting["thread"].is_alive()  # type: ignore[attr-defined]
        finally:
            osd.send_signal(signal.SIGCONT)
        assert "seconds" in failing, "the read of the 2 s image hung past its timeout"
        error = failing.get("error")
        # librados's ETIMEDOUT, as the node raised it, is what read(2) returns.
        assert isinstance(error, OSError) and error.errno == errno.ETIMEDOUT, failing
        waiting["thread"].join(60)  # type: ignore[attr-defined]
        assert waiting.get("data") == data[3 << 20 : 4 << 20], waiting.get("error")
        assert patient.read_bytes() == data
        # Once the OSD runs, the failed range reads right (nothing wrong was cached). With a
        # 2 s timeout a loaded machine may time out again while the OSD catches up: that is
        # the same error, never other bytes.
        for attempt in range(3):
            try:
                assert quick.read_bytes() == data
                break
            except TimeoutError:
                if attempt == 2:
                    raise


def test_mount_with_unreachable_monitor_fails_clearly(ceph_cluster: Cluster,
                                                      tmp_path: Path) -> None:
    """No monitor answers: ``mount`` fails with a message naming the image and the monitors
    within ``client_mount_timeout`` (2 s here), nothing mounted."""
    conf = tmp_path / "dead.conf"
    conf.write_text(ceph_cluster.conf.read_text().replace(
        ceph_cluster.mon_addr, "[v2:127.0.0.1:9,v1:127.0.0.1:10]"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    name = f"rbd:rbd/x:conf={conf}:client_mount_timeout=2"
    proc = vdiskfs("mount", "--format", "raw", name, mnt, check=False)
    assert proc.returncode != 0
    assert "cannot reach the cluster's monitors within 2 s" in proc.stderr, proc.stderr
    assert name in proc.stderr
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []
