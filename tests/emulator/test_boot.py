"""Booting the test kernel on disks served by the vdiskfs stack (acceptance of the emulator).

Each boot goes all the way: the kernel probes the GPT through the stack, mounts the ext4 root,
runs /sbin/init (scripts/guest/init.sh: md5sums a partition against the host's value, writes a
file, powers off). Where /dev/kvm is the emulated kvm_pvm, guest system calls work only thanks
to the VMM's SyscallCompleter (emulator/NOTES.md); with VDISKFS_BOOT_NO_USERSPACE=1 the tests
accept a guest that stops at its first system call instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.emulator.guest import BootResult, RootDisk, boot, is_pvm, stop_group
from tests.support.ceph import Cluster
from tests.support.http_server import PASSWORD, USER, Nginx
from tests.support.nbd import qemu_nbd
from vdiskfs.block.registry import driver_names, get_driver

pytestmark = [pytest.mark.boot, pytest.mark.slow]

MEMORY = "64M"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _md5_range(path: Path, offset: int, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(size)).hexdigest()


def _extract(path: Path, offset: int, size: int, out: Path) -> Path:
    with open(path, "rb") as f:
        f.seek(offset)
        out.write_bytes(f.read(size))
    return out


def _guest_file(partition: Path) -> str:
    """The file the test guest's init writes, read back from the ext4 partition."""
    return subprocess.run(["debugfs", "-R", "cat /vdiskfs-guest-was-here", str(partition)],
                          capture_output=True, text=True).stdout


def _root_partition_of(image: Path, disk: RootDisk, tmp_path: Path) -> Path:
    """Partition 1 of any image format, as QEMU reads it."""
    raw = tmp_path / f"{image.stem}-converted.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    return _extract(raw, disk.root_offset, disk.root_size, tmp_path / f"{image.stem}-p1.ext4")


def _superblock(partition: Path) -> dict[str, str]:
    text = subprocess.run(["dumpe2fs", "-h", str(partition)], capture_output=True, text=True,
                          check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in
                                                  text.splitlines()) if v}


def _assert_kernel_ran_init_from_disk(result: BootResult, *, writable: bool) -> None:
    out = result.output
    assert "vda: vda1 vda2" in out, out[-3000:]  # the GPT was probed through the stack
    assert "EXT4-fs (vda1): mounted filesystem" in out, out[-3000:]
    mode = "" if writable else " readonly"
    assert f"VFS: Mounted root (ext4 filesystem){mode} on device" in out, out[-3000:]
    assert "Run /sbin/init as init process" in out, out[-3000:]
    if os.environ.get("VDISKFS_BOOT_NO_USERSPACE"):
        # The kernel read and mapped /sbin/init (and its /bin/sh) from ext4; the first system
        # call faulted. A panic is a non-zero exit with a one-line reason.
        assert result.returncode == 2, result.stderr
        assert re.search(r"^vdiskfs boot: panic: guest panic: Attempted to kill init!",
                         result.stderr, re.M), result.stderr
        return
    assert result.returncode == 0, result.stderr + out[-3000:]
    assert "VDISKFS-GUEST: init running" in out
    assert "VDISKFS-GUEST: md5 ok /dev/vda2" in out, out[-3000:]
    assert "reboot: System halted" in out


def _assert_layers_counted(stats: dict, disk: str, *, writes: bool) -> None:
    layers = {k: v for k, v in stats[disk].items() if re.fullmatch(r"\d+-\w+", k)}
    assert layers, stats[disk].keys()
    for name, layer in layers.items():
        assert layer["rd_operations"] > 0 and layer["rd_bytes"] > 0, name
        if writes:
            assert layer["wr_operations"] > 0 and layer["wr_bytes"] > 0, name
        else:
            assert layer["wr_operations"] == 0, name
    blk = stats[disk]["virtio-blk"]
    assert blk["read_requests"] > 0 and blk["read_bytes"] > 0
    assert (blk["write_requests"] > 0) == writes
    assert blk["malformed_chains"] == 0 and blk["status_ioerr"] == 0
    vm = stats["vm"]
    assert vm["exits_total"] > 0 and vm["exits"]["io"] > 0
    assert vm["console_milestones_s"]["run_init"] > 0


def test_ext4_root_read_write_on_a_raw_gpt_disk(guest_kernel: Path, root_disk: RootDisk,
                                                tmp_path: Path) -> None:
    data_before = _md5_range(root_disk.path, root_disk.data_offset, root_disk.data_size)
    assert data_before == root_disk.data_md5
    sb_before = _superblock(_extract(root_disk.path, root_disk.root_offset, root_disk.root_size,
                                     tmp_path / "before.ext4"))
    assert sb_before["Mount count"] == "0"

    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY,
        "--disk", f"{root_disk.path},format=raw",
        "--append", f"root=/dev/vda1 rw vdiskfs.md5dev=/dev/vda2 vdiskfs.md5={data_before}",
        stats=tmp_path / "stats.json",
    )
    _assert_kernel_ran_init_from_disk(result, writable=True)

    partition = _extract(root_disk.path, root_disk.root_offset, root_disk.root_size,
                         tmp_path / "after.ext4")
    sb_after = _superblock(partition)
    assert int(sb_after["Mount count"]) > 0
    assert sb_after["Last mount time"] != sb_before["Last mount time"]
    fsck = subprocess.run(["e2fsck", "-fn", str(partition)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert _md5_range(root_disk.path, root_disk.data_offset, root_disk.data_size) == data_before
    if not os.environ.get("VDISKFS_BOOT_NO_USERSPACE"):
        assert "written by the vdiskfs test guest" in _guest_file(partition)

    assert result.stats is not None
    _assert_layers_counted(result.stats, "root", writes=True)
    assert result.stats["vm"]["outcome"]["status"] == result.returncode
    if is_pvm() and not os.environ.get("VDISKFS_BOOT_NO_USERSPACE"):
        assert result.stats["vm"]["pvm_syscalls_completed"] > 0


@pytest.mark.skipif("qcow2" not in driver_names(), reason="no qcow2 driver")
def test_bzimage_with_a_read_only_qcow2_root(guest_kernel: Path, root_disk: RootDisk,
                                             tmp_path: Path) -> None:
    image = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(root_disk.path),
                    str(image)], check=True)
    before = _sha256(image)
    result = boot(
        "--kernel", str(guest_kernel.parent / "bzImage"), "--memory", MEMORY,
        "--disk", f"{image},readonly=on",
        "--append", f"root=/dev/vda1 ro vdiskfs.md5dev=/dev/vda2 vdiskfs.md5={root_disk.data_md5}",
        stats=tmp_path / "stats.json",
    )
    _assert_kernel_ran_init_from_disk(result, writable=False)
    assert _sha256(image) == before
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert result.stats is not None
    assert result.stats["root"]["0-qcow2"]["rd_operations"] > 0
    _assert_layers_counted(result.stats, "root", writes=False)


@pytest.mark.ceph
def test_boot_from_a_qcow2_stored_in_rbd(guest_kernel: Path, root_disk: RootDisk,
                                         ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``--disk rbd:...``: the qcow2 kept in an RBD image of the test cluster, read by the
    qcow2 driver over the rbd node; the guest boots read-only and md5s its data partition."""
    image = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(root_disk.path),
                    str(image)], check=True)
    ceph_cluster.rbd("import", image, "rbd/boot-root")
    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY,
        "--disk", f"{ceph_cluster.qemu_name('rbd/boot-root')},readonly=on",
        "--append", f"root=/dev/vda1 ro vdiskfs.md5dev=/dev/vda2 vdiskfs.md5={root_disk.data_md5}",
        stats=tmp_path / "stats.json",
    )
    _assert_kernel_ran_init_from_disk(result, writable=False)
    assert result.stats is not None
    assert any(k.endswith("-rbd") for k in result.stats["boot-root"]), result.stats.keys()
    _assert_layers_counted(result.stats, "boot-root", writes=False)


def _qcow2_writable() -> bool:
    return "qcow2" in driver_names() and bool(getattr(get_driver("qcow2"), "supports_write",
                                                      False))


@pytest.mark.skipif(not _qcow2_writable(), reason="the qcow2 driver cannot write yet")
def test_ext4_root_read_write_on_qcow2(guest_kernel: Path, root_disk: RootDisk,
                                       tmp_path: Path) -> None:
    image = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(root_disk.path),
                    str(image)], check=True)
    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY, "--disk", str(image),
        "--append", f"root=/dev/vda1 rw vdiskfs.md5dev=/dev/vda2 vdiskfs.md5={root_disk.data_md5}",
        stats=tmp_path / "stats.json",
    )
    _assert_kernel_ran_init_from_disk(result, writable=True)
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    partition = _root_partition_of(image, root_disk, tmp_path)
    assert int(_superblock(partition)["Mount count"]) > 0
    fsck = subprocess.run(["e2fsck", "-fn", str(partition)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    if not os.environ.get("VDISKFS_BOOT_NO_USERSPACE"):
        assert "written by the vdiskfs test guest" in _guest_file(partition)
    assert result.stats is not None
    _assert_layers_counted(result.stats, "root", writes=True)


@pytest.mark.skipif(not _qcow2_writable(), reason="overlay= needs qcow2 write support")
def test_overlay_leaves_the_base_unchanged(guest_kernel: Path, root_disk: RootDisk,
                                           tmp_path: Path) -> None:
    before = _sha256(root_disk.path)
    overlay = tmp_path / "overlay.qcow2"
    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY,
        "--disk", f"{root_disk.path},format=raw,overlay={overlay}",
        "--append", f"root=/dev/vda1 rw vdiskfs.md5dev=/dev/vda2 vdiskfs.md5={root_disk.data_md5}",
    )
    _assert_kernel_ran_init_from_disk(result, writable=True)
    assert _sha256(root_disk.path) == before
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    backing = os.path.join(os.path.dirname(overlay), info["backing-filename"])
    assert os.path.samefile(backing, root_disk.path)
    partition = _root_partition_of(overlay, root_disk, tmp_path)
    assert int(_superblock(partition)["Mount count"]) > 0
    if not os.environ.get("VDISKFS_BOOT_NO_USERSPACE"):
        assert "written by the vdiskfs test guest" in _guest_file(partition)


def test_root_over_https_and_a_writable_disk_over_nbd(guest_kernel: Path, root_disk: RootDisk,
                                                     nginx: Nginx, tmp_path: Path) -> None:
    """vda: the root disk as a qcow2 on nginx over HTTPS (read-only, with credentials in the
    URL); vdb: a copy served writable by qemu-nbd on a Unix socket, where init writes its
    file. The credentials reach no output or stats."""
    served = nginx.root / f"boot-{tmp_path.name}" / "root.qcow2"
    served.parent.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(root_disk.path),
                    str(served)], check=True)
    before = _sha256(served)
    data = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(root_disk.path),
                    str(data)], check=True)
    url = nginx.url(f"{served.parent.name}/root.qcow2", tls=True,
                    credentials=f"{USER}:{PASSWORD}@")
    with qemu_nbd(data, "qcow2", export="data", writable=True,
                  unix=tmp_path / "nbd.sock") as server:
        result = boot(
            "--kernel", str(guest_kernel), "--memory", MEMORY, "--ca-file", str(nginx.ca_file),
            "--disk", url, "--disk", f"{server.url},format=raw",
            "--append", f"root=/dev/vda1 ro vdiskfs.md5dev=/dev/vda2 "
                        f"vdiskfs.md5={root_disk.data_md5} vdiskfs.writedev=/dev/vdb1",
            stats=tmp_path / "stats.json",
        )
    _assert_kernel_ran_init_from_disk(result, writable=False)
    assert "vdb: vdb1 vdb2" in result.output, result.output[-3000:]
    assert _sha256(served) == before
    stats_text = (tmp_path / "stats.json").read_text()
    for text in (result.output, result.stderr, stats_text):
        assert PASSWORD not in text
    assert result.stats is not None
    assert f"{USER}:***@" in result.stats["root"]["tree"]
    _assert_layers_counted(result.stats, "root", writes=False)
    assert [k for k in result.stats["data"] if re.fullmatch(r"\d+-\w+", k)] == [
        "0-raw", "1-nbd"]

    # The guest's writes reached the export: qemu's own qcow2 is consistent, the file init
    # wrote is on vdb1's ext4, vdb2 is as it was.
    check = subprocess.run(["qemu-img", "check", str(data)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    partition = _root_partition_of(data, root_disk, tmp_path)
    fsck = subprocess.run(["e2fsck", "-fn", str(partition)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    raw = tmp_path / "data-converted.raw"
    assert _md5_range(raw, root_disk.data_offset, root_disk.data_size) == root_disk.data_md5
    if not os.environ.get("VDISKFS_BOOT_NO_USERSPACE"):
        compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                                  str(root_disk.path), str(data)], capture_output=True,
                                 text=True)
        assert compare.returncode == 1, compare.stdout + compare.stderr  # 1: they differ
        assert "written by the vdiskfs test guest" in _guest_file(partition)
        _assert_layers_counted(result.stats, "data", writes=True)


@pytest.mark.mount
def test_live_stats_under_mount(guest_kernel: Path, root_disk: RootDisk, tmp_path: Path) -> None:
    import json
    import sys

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cmd = [sys.executable, "-m", "emulator", "--kernel", str(guest_kernel), "--memory", MEMORY,
           # Throttled (generously): the throttle filter sits on top and its control file
           # takes new limits while the guest runs.
           "--disk", f"{root_disk.path},format=raw,throttle.iops-total=100000,"
           "throttle.bps-total=1G", "--mount", str(mountpoint),
           "--append", "root=/dev/vda1 rw"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        vm_file = mountpoint / "stats" / "vm"
        blk_file = mountpoint / "stats" / "root" / "virtio-blk"
        deadline = time.monotonic() + 60
        while not vm_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.2)
        first = json.loads(vm_file.read_text())
        # The guest keeps running: the VM's exits and the device's requests move, live.
        deadline = time.monotonic() + 120
        while True:
            vm = json.loads(vm_file.read_text())
            blk = json.loads(blk_file.read_text())
            if blk["read_requests"] > 0 and vm["exits_total"] > first["exits_total"]:
                break
            assert proc.poll() is None, "the guest ended before its disk was read"
            assert time.monotonic() < deadline, (vm, blk)
            time.sleep(0.5)
        assert vm["outcome"] is None  # still running
        layer = json.loads((mountpoint / "stats" / "root" / "1-raw").read_text())
        assert layer["rd_operations"] > 0
        assert sorted(os.listdir(mountpoint / "stats" / "root"))[:3] == ["0-throttle", "1-raw",
                                                                          "2-file"]
        throttle = mountpoint / "stats" / "root" / "throttle"
        assert "iops-total=100000" in throttle.read_text()
        throttle.write_text("iops-total=50000\n")
        assert throttle.read_text().startswith("iops-total=50000,")
        # The disk itself, read-only while the guest owns it.
        view = mountpoint / "root.raw"
        # (The mount is not "ro", for the throttle control file; the disk's file refuses.)
        with pytest.raises(OSError) as refused:
            open(view, "r+b")  # noqa: SIM115
        assert refused.value.errno == errno.EROFS
        with open(view, "rb") as f:
            f.seek(root_disk.data_offset)
            assert hashlib.md5(f.read(root_disk.data_size)).hexdigest() == root_disk.data_md5
        out, _ = proc.communicate(timeout=240)
        assert b"Run /sbin/init" in out
    finally:
        stop_group(proc)
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert not os.path.ismount(mountpoint)


@pytest.mark.skipif(bool(os.environ.get("VDISKFS_BOOT_NO_USERSPACE")),
                    reason="VDISKFS_BOOT_NO_USERSPACE is set")
def test_user_space_from_an_initramfs(guest_kernel: Path, root_disk: RootDisk,
                                      tmp_path: Path) -> None:
    """The test initramfs's /init md5sums /dev/vda (a small data disk), writes a file on
    /dev/vdb1 (the root disk's ext4) and powers off."""
    initramfs = tmp_path / "initramfs.cpio"
    subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts" / "guest" /
                        "build-initramfs.sh"), str(initramfs)], check=True, capture_output=True)
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(1 << 20))
    whole = hashlib.md5(data.read_bytes()).hexdigest()
    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY, "--initrd", str(initramfs),
        "--disk", f"{data},format=raw,readonly=on",
        "--disk", f"{root_disk.path},format=raw",
        "--append", f"rdinit=/init vdiskfs.md5dev=/dev/vda vdiskfs.md5={whole} "
                    "vdiskfs.writedev=/dev/vdb1",
    )
    assert result.returncode == 0, result.stderr + result.output[-3000:]
    assert f"VDISKFS-GUEST: md5 ok /dev/vda {whole}" in result.output
    assert "VDISKFS-GUEST: wrote /mnt/vdiskfs-guest-was-here" in result.output
    partition = _extract(root_disk.path, root_disk.root_offset, root_disk.root_size,
                         tmp_path / "p1.ext4")
    assert "written by the vdiskfs test guest" in _guest_file(partition)


def test_twelve_disks_found_through_acpi(guest_kernel: Path, root_disk: RootDisk,
                                        tmp_path: Path) -> None:
    """Twelve virtio-mmio disks, described only in the DSDT (the test kernel has no
    VIRTIO_MMIO_CMDLINE_DEVICES), all attach; the twelfth interrupts on IOAPIC pin 18, which
    only the MADT's IOAPIC reaches: init md5sums it through that interrupt."""
    sizes = [(i + 1) * (128 << 10) for i in range(11)]
    disks = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"d{i}.raw"
        path.write_bytes(os.urandom(size))
        disks += ["--disk", f"{path},format=raw,readonly=on"]
    last = hashlib.md5((tmp_path / "d10.raw").read_bytes()).hexdigest()
    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY,
        "--disk", f"{root_disk.path},format=raw,readonly=on", *disks,
        "--append", f"root=/dev/vda1 ro vdiskfs.md5dev=/dev/vdl vdiskfs.md5={last}",
        stats=tmp_path / "stats.json",
    )
    out = result.output
    # Not from a command-line list: that path logs "virtio-mmio: Registering device".
    assert "virtio-mmio: Registering device" not in out
    names = "abcdefghijkl"
    for name, size in zip(names[1:], sizes, strict=True):
        assert f"[vd{name}] {size // 512} 512-byte logical blocks" in out, out[-4000:]
    assert "vda: vda1 vda2" in out, out[-3000:]
    assert "VFS: Mounted root (ext4 filesystem) readonly on device" in out, out[-3000:]
    if not os.environ.get("VDISKFS_BOOT_NO_USERSPACE"):
        assert result.returncode == 0, result.stderr + out[-3000:]
        assert f"VDISKFS-GUEST: md5 ok /dev/vdl {last}" in out, out[-3000:]
    assert result.stats is not None
    assert result.stats["d10"]["virtio-blk"]["read_requests"] > 0


def test_interactive_console(guest_kernel: Path, root_disk: RootDisk) -> None:
    """The serial console on a terminal: the guest's shell reads what is typed, and Ctrl-A x
    leaves the VM."""
    import pty
    import select
    import sys

    pid, fd = pty.fork()
    if pid == 0:  # the child: the VMM on the pty
        os.chdir(Path(__file__).resolve().parents[2])
        os.execv(sys.executable, [sys.executable, "-m", "emulator", "--kernel",
                                  str(guest_kernel), "--memory", MEMORY,
                                  "--disk", f"{root_disk.path},format=raw",
                                  "--append", "root=/dev/vda1 rw init=/bin/sh"])
    output = bytearray()

    def read_until(marker: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} on the console:\n{output[-2000:]!r}"
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if ready:
                try:
                    output.extend(os.read(fd, 4096))
                except OSError:  # the VMM closed the terminal
                    raise AssertionError(f"the VMM ended before {marker!r}:\n"
                                         f"{output[-2000:]!r}") from None

    try:
        read_until(b"Run /bin/sh as init process", 180)
        time.sleep(2)  # let the shell start reading
        os.write(fd, b"echo typed-$((6 * 7))\r")
        read_until(b"typed-42", 60)
        os.write(fd, b"\x01x")  # Ctrl-A x: quit
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "Ctrl-A x did not end the VMM"
            time.sleep(0.2)
        assert os.waitstatus_to_exitcode(status) == 130, output[-1500:].decode(errors="replace")
    finally:
        try:
            os.kill(pid, 15)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


@pytest.mark.skipif(bool(os.environ.get("VDISKFS_BOOT_NO_USERSPACE")),
                    reason="VDISKFS_BOOT_NO_USERSPACE is set")
def test_guest_keeps_a_queue_busy(guest_kernel: Path, root_disk: RootDisk,
                                  tmp_path: Path) -> None:
    """The guest keeps /dev/vdb's queue busy (scripts/guest/init.sh, vdiskfs.parallel=): two dd
    processes copy 1 MiB blocks at once with O_DIRECT, then 16 scattered 4 KiB copies are
    written back by one sync, which hands them to the driver in one plugged batch. The device
    serves them together (max_in_flight > 1) and every byte lands where it should. The kernel
    runs ``quiet``, as Debian's grub.cfg boots it: so few VM exits that PVM's system-call
    fix-up must still find the page-fault entry the kernel moved to (pvm.RECHECK_SECONDS)."""
    jobs, block, scatter, page = 2, 1 << 20, 16, 4096
    area = 2 * jobs * block  # where the scattered copies go, every other page
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(area + 2 * scatter * page))
    before = data.read_bytes()
    started = time.monotonic()
    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY,
        "--disk", f"{root_disk.path},format=raw",
        "--disk", f"{data},format=raw",
        "--append", f"root=/dev/vda1 rw quiet vdiskfs.parallel=/dev/vdb "
                    f"vdiskfs.parallel_jobs={jobs} "
                    f"vdiskfs.parallel_kib={block >> 10} vdiskfs.scatter={scatter}",
        stats=tmp_path / "stats.json",
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr + result.output[-3000:]
    assert (f"VDISKFS-GUEST: parallel copies done: {jobs} jobs, {scatter} scattered, 0 failed"
            in result.output), result.output[-3000:]
    after = data.read_bytes()
    expected = bytearray(before)
    for i in range(jobs):
        expected[(jobs + i) * block : (jobs + i + 1) * block] = before[i * block : (i + 1) * block]
    for i in range(scatter):
        dest = area + 2 * i * page
        expected[dest : dest + page] = before[i * page : (i + 1) * page]
    for offset in range(0, len(after), page):  # name the first page that differs
        assert after[offset : offset + page] == expected[offset : offset + page], offset
    assert result.stats is not None
    blk = result.stats["data"]["virtio-blk"]
    summary = {k: blk[k] for k in ("max_in_flight", "max_in_flight_bytes", "used_batches",
                                    "max_used_batch", "interrupts", "queue_notifications")}
    assert blk["max_in_flight"] > 1, summary
    assert blk["read_bytes"] >= jobs * block and blk["write_bytes"] >= jobs * block, blk
    assert blk["status_ioerr"] == 0 and blk["malformed_chains"] == 0, blk
    assert blk["in_flight"] == 0 and blk["in_flight_bytes"] == 0, blk
    assert blk["completions_discarded"] == 0, blk
    assert blk["max_in_flight"] <= blk["in_flight_cap"], blk
    assert blk["max_in_flight_bytes"] <= blk["in_flight_bytes_cap"], blk
    assert blk["used_batches"] > 0 and blk["max_used_batch"] >= 1, blk
    # Every batch either interrupted the guest or was suppressed by its EVENT_IDX.
    assert blk["interrupts"] + blk["interrupts_suppressed"] == blk["used_batches"], blk
    print(f"queue-busy guest: {elapsed:.1f} s, {summary}, "
          f"milestones {result.stats['vm']['console_milestones_s']}")
