"""Discard and write-zeroes from a booted guest, down to the image (issue 11).

The guest's ext4 and block layer decide on their own to send DISCARD and WRITE_ZEROES once the
virtio-blk device offers them (Linux 6.1 reads ``max_discard_sectors``, ``max_discard_seg``,
``discard_sector_alignment`` and ``max_write_zeroes_sectors``); these tests make it do so and
check the result on the host with QEMU's tools: the image is consistent, what was freed left
the qcow2 file, and every layer counted it. One boot each (about a minute where KVM is
emulated). The guest side is scripts/guest/init.sh (``vdiskfs.trim=``, ``vdiskfs.zeroes=``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.emulator.guest import GUEST_SCRIPTS, BootResult, RootDisk, boot
from vdiskfs.block.registry import driver_names, get_driver

MiB = 1 << 20
CLUSTER = 64 << 10
MEMORY = "64M"

pytestmark = [
    pytest.mark.boot,
    pytest.mark.slow,
    pytest.mark.skipif(bool(os.environ.get("VDISKFS_BOOT_NO_USERSPACE")),
                       reason="VDISKFS_BOOT_NO_USERSPACE is set"),
    pytest.mark.skipif(not ("qcow2" in driver_names() and getattr(
        get_driver("qcow2"), "supports_write", False)), reason="needs qcow2 write support"),
]


def _run(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _check(image: Path) -> dict:
    """``qemu-img check``: exit status 0 means no corruption and no leaked cluster."""
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _guest_ok(result: BootResult) -> str:
    out = result.output
    assert result.returncode == 0, result.stderr + out[-3000:]
    assert "reboot: System halted" in out, out[-3000:]
    return out


def _queue_limits(out: str, dev: str) -> dict[str, int]:
    """The limits the guest kernel derived from the device's config (init.sh prints them)."""
    match = re.search(rf"^VDISKFS-GUEST: queue {dev} (.*)$", out, re.M)
    assert match, out[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def _assert_limits(limits: dict[str, int]) -> None:
    # 2^21 sectors (1 GiB) and 16 ranges, in 512-byte units: what device.py offers.
    assert limits["discard_max_bytes"] == 1 << 30, limits
    assert limits["write_zeroes_max_bytes"] == 1 << 30, limits
    assert limits["discard_granularity"] == 512, limits
    assert limits["max_discard_segments"] == 16, limits


def _ext4_overlay_holding_a_file(tmp_path: Path, file_mib: int) -> tuple[Path, Path]:
    """``(base.raw, overlay.qcow2)``: an empty 96 MiB ext4 as the base, and an overlay that
    holds exactly what adding a ``file_mib`` MiB file of random bytes (``big.bin``) changed.

    The overlay is made by QEMU, not by the stack under test: over a copy of the base with
    the file added, then rebased onto the base, which writes into it every cluster where the
    two differ."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(96 * MiB)
    # Inode tables zeroed now: no lazy-init thread zeroing them in the guest meanwhile.
    _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "trim",
         "-E", "lazy_itable_init=0,lazy_journal_init=0", base)
    full = tmp_path / "full.raw"
    shutil.copyfile(base, full)
    payload = tmp_path / "big.bin"
    payload.write_bytes(os.urandom(file_mib * MiB))
    _run("debugfs", "-w", "-R", f"write {payload} big.bin", full)
    assert f"Size: {file_mib * MiB}" in _run("debugfs", "-R", "stat big.bin", full)
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
         "-b", "full.raw", "-F", "raw", "overlay.qcow2", cwd=tmp_path)
    _run("qemu-img", "rebase", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "overlay.qcow2",
         cwd=tmp_path)
    full.unlink()
    payload.unlink()
    return base, tmp_path / "overlay.qcow2"


def test_fstrim_in_the_guest_frees_the_overlay(guest_kernel: Path, root_disk: RootDisk,
                                               tmp_path: Path) -> None:
    """The guest deletes a 50 MiB file from an ext4 whose writes go to a qcow2 overlay and runs
    ``fstrim``: ext4 discards its free space, the overlay's clusters of the file become zero
    clusters and their host clusters are punched out of the overlay file; the base is not
    touched."""
    file_mib = 50
    base, overlay = _ext4_overlay_holding_a_file(tmp_path, file_mib)
    base_sha = _sha256(base)
    check_before = _check(overlay)
    allocated_before = _allocated(overlay)
    assert check_before["allocated-clusters"] * CLUSTER >= file_mib * MiB, check_before

    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY,
        "--disk", f"{root_disk.path},format=raw",
        "--disk", f"{base},format=raw,overlay={overlay}",
        "--append", "root=/dev/vda1 rw vdiskfs.trim=/dev/vdb vdiskfs.trim_rm=big.bin",
        stats=tmp_path / "stats.json",
    )
    out = _guest_ok(result)
    _assert_limits(_queue_limits(out, "/dev/vdb"))
    trimmed = re.search(r"^VDISKFS-GUEST: fstrim /mnt: (\d+) bytes trimmed", out, re.M)
    assert trimmed, out[-3000:]
    assert int(trimmed.group(1)) >= file_mib * MiB

    # The image: consistent, the file's clusters gone from the overlay and from its file.
    check_after = _check(overlay)
    freed_clusters = check_before["allocated-clusters"] - check_after["allocated-clusters"]
    freed_bytes = allocated_before - _allocated(overlay)
    print(f"fstrim: guest trimmed {int(trimmed.group(1)) / MiB:.1f} MiB; overlay "
          f"{freed_clusters} clusters ({freed_clusters * CLUSTER / MiB:.1f} MiB) fewer, "
          f"its file {freed_bytes / MiB:.1f} MiB smaller; {_queue_limits(out, '/dev/vdb')}")
    assert freed_clusters * CLUSTER >= 45 * MiB, (check_before, check_after)
    assert freed_bytes >= 45 * MiB, (allocated_before, _allocated(overlay))
    assert _sha256(base) == base_sha
    raw = tmp_path / "after.raw"
    _run("qemu-img", "convert", "-O", "raw", overlay, raw)
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "big.bin" not in _run("debugfs", "-R", "ls -l /", raw)

    # Every layer the discards crossed counted them; the base saw none.
    assert result.stats is not None
    disk = result.stats["base"]
    blk = disk["virtio-blk"]
    assert blk["discard_requests"] > 0 and blk["discard_bytes"] >= file_mib * MiB, blk
    assert blk["status_ioerr"] == 0 and blk["status_unsupp"] == 0, blk
    assert blk["flush_requests"] > 0, blk
    top, top_file = disk["0-qcow2"], disk["1-file"]
    print(f"fstrim: virtio-blk {blk['discard_requests']} discards, "
          f"{blk['discard_bytes'] / MiB:.1f} MiB; qcow2 unmap {top['unmap_operations']} ops "
          f"{top['unmap_bytes'] / MiB:.1f} MiB, {top['clusters_discarded']} clusters; overlay "
          f"file unmap {top_file['unmap_operations']} ops {top_file['unmap_bytes'] / MiB:.1f} MiB")
    assert top["unmap_bytes"] == blk["discard_bytes"], top
    assert top["failed_unmap_operations"] == 0 and top["clusters_discarded"] > 0, top
    assert top_file["unmap_bytes"] >= 45 * MiB, top_file
    for name in ("2-raw", "3-file"):
        assert disk[name]["unmap_operations"] == 0 and disk[name]["zero_operations"] == 0
        assert disk[name]["wr_operations"] == 0, name


def _build_zeroes_tool(tmp_path: Path) -> Path:
    """A directory holding vdiskfs-zeroes (scripts/guest/zeroes.c), built static."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to build vdiskfs-zeroes")
    tools = tmp_path / "tools"
    tools.mkdir()
    proc = subprocess.run([cc, "-static", "-Os", "-s", "-o", str(tools / "vdiskfs-zeroes"),
                           str(GUEST_SCRIPTS / "zeroes.c")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a static vdiskfs-zeroes: {proc.stderr[-500:]}")
    return tools


def test_write_zeroes_and_discard_from_the_guest(guest_kernel: Path, root_disk: RootDisk,
                                                 tmp_path: Path) -> None:
    """On a writable qcow2 full of data, the guest sends a WRITE_ZEROES that may unmap
    (``fallocate -p``), one that may not (``blkdiscard -z``'s BLKZEROOUT) and a DISCARD: the
    first and the last free their clusters, the second keeps them allocated as zero clusters,
    and all three ranges read as zeros afterwards."""
    tools = _build_zeroes_tool(tmp_path)
    tools_disk = tmp_path / "tools.raw"
    with open(tools_disk, "wb") as f:
        f.truncate(8 * MiB)
    _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
         "-d", tools, tools_disk)
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(16 * MiB))
    target = tmp_path / "target.qcow2"
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}",
         source, target)
    check_before = _check(target)
    allocated_before = _allocated(target)
    punch = (1 * MiB, 3 * MiB)  # 48 whole clusters
    zero = (8 * MiB + 4096, 2 * MiB - 8192)  # partial clusters at both ends, 30 whole ones
    discard = (12 * MiB, 1 * MiB)  # 16 whole clusters
    ops = ",".join(f"{mode}:{offset}:{length}" for mode, (offset, length) in
                   (("punch", punch), ("zero", zero), ("discard", discard)))

    result = boot(
        "--kernel", str(guest_kernel), "--memory", MEMORY,
        "--disk", f"{root_disk.path},format=raw",
        "--disk", f"{tools_disk},format=raw,readonly=on",
        "--disk", str(target),
        "--append", f"root=/dev/vda1 rw vdiskfs.tools=/dev/vdb vdiskfs.zeroes=/dev/vdc "
                    f"vdiskfs.zeroes_ops={ops}",
        stats=tmp_path / "stats.json",
    )
    out = _guest_ok(result)
    assert "VDISKFS-GUEST: zeroes done" in out, out[-3000:]
    _assert_limits(_queue_limits(out, "/dev/vdc"))

    check_after = _check(target)
    expected = bytearray(source.read_bytes())
    for offset, length in (punch, zero, discard):
        expected[offset : offset + length] = bytes(length)
    raw = tmp_path / "after.raw"
    _run("qemu-img", "convert", "-O", "raw", target, raw)
    assert raw.read_bytes() == expected
    # The unmapping write-zeroes and the discard gave their clusters back; BLKZEROOUT kept its
    # clusters allocated (zero flag).
    freed_clusters = check_before["allocated-clusters"] - check_after["allocated-clusters"]
    assert freed_clusters == (punch[1] + discard[1]) // CLUSTER, (check_before, check_after)
    freed_bytes = allocated_before - _allocated(target)
    assert freed_bytes >= punch[1] + discard[1] - CLUSTER, freed_bytes
    mapping = json.loads(_run("qemu-img", "map", "--output=json", target))
    kept = [m for m in mapping if m["zero"] and "offset" in m]
    assert sum(m["length"] for m in kept) == 30 * CLUSTER, kept
    print(f"write-zeroes: {freed_clusters} clusters freed, file {freed_bytes / MiB:.2f} MiB "
          "smaller")

    assert result.stats is not None
    disk = result.stats["target"]
    blk = disk["virtio-blk"]
    zeroed = punch[1] + zero[1]
    assert blk["write_zeroes_requests"] >= 2 and blk["write_zeroes_bytes"] == zeroed, blk
    assert blk["discard_requests"] >= 1 and blk["discard_bytes"] == discard[1], blk
    assert blk["status_ioerr"] == 0 and blk["status_unsupp"] == 0, blk
    top, top_file = disk["0-qcow2"], disk["1-file"]
    print(f"write-zeroes: virtio-blk {blk['write_zeroes_requests']} write-zeroes "
          f"{blk['write_zeroes_bytes']} B, {blk['discard_requests']} discards "
          f"{blk['discard_bytes']} B; qcow2 zero {top['zero_operations']} ops {top['zero_bytes']}"
          f" B, unmap {top['unmap_bytes']} B, {top['zero_clusters_written']} zero clusters; "
          f"file unmap {top_file['unmap_operations']} ops {top_file['unmap_bytes']} B")
    assert top["zero_bytes"] == zeroed and top["unmap_bytes"] == discard[1], top
    assert top["zero_clusters_written"] >= 48 + 30, top
    # Freed clusters are punched out of the file once their metadata is on disk (the guest's
    # flush after the operations).
    assert top_file["unmap_bytes"] == punch[1] + discard[1], top_file
