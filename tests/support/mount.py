"""Mount images with the real ``vdiskfs mount`` command in a separate daemon process.

A FUSE server and a reader of its mount in one process deadlock easily (pyfuse3's own tests run
the file system in a subprocess), so tests always go through the command line. Cleanup unmounts
and waits for the daemon also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vdiskfs.fs.mount import find_mount, process_alive


def vdiskfs(*args: str | os.PathLike[str], check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "vdiskfs", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"vdiskfs {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}"
        )
    return proc


def force_unmount(mountpoint: str | os.PathLike[str]) -> None:
    """Last resort: lazy unmount and kill the daemon, so no test leaves a mount behind."""
    info = find_mount(str(mountpoint))
    if info is None or not info.fstype.startswith("fuse"):
        return
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    pid = info.daemon_pid
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@contextlib.contextmanager
def mounted(*images: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
            options: tuple[str, ...] = ()) -> Iterator[Path]:
    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    vdiskfs("mount", *options, *images, mnt)
    try:
        yield mnt
    finally:
        proc = vdiskfs("unmount", mnt, check=False)
        if proc.returncode != 0:
            force_unmount(mnt)
            raise AssertionError(f"unmount failed: {proc.stderr}")


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False



@contextlib.contextmanager
def loop_mounted(image: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *,
                 read_only: bool = True) -> Iterator[Path]:
    """``mount -o loop`` a file system image (a partition file); always unmounted after."""
    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    opts = "loop,ro" if read_only else "loop"
    subprocess.run(["mount", "-o", opts, str(image), str(mnt)], check=True,
                   capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if find_mount(str(mnt)) is not None:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextlib.contextmanager
def loop_device(image: str | os.PathLike[str], *, partscan: bool = False,
                read_only: bool = True, sector_size: int | None = None) -> Iterator[str]:
    """``losetup --find --show [-P] [-r] [--sector-size N]``; the device is always detached
    after."""
    args = ["losetup", "--find", "--show"] + (["-P"] if partscan else []) + (
        ["-r"] if read_only else []) + (
        ["--sector-size", str(sector_size)] if sector_size else [])
    device = subprocess.run([*args, str(image)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextlib.contextmanager
def child_fs_mounted(module: str, args: list[str], mountpoint: Path,
                     fsname: str) -> Iterator[None]:
    """Run the test file system ``python -m module args...`` (which mounts itself at
    ``mountpoint`` with ``fsname=fsname``) until its mount appears; unmount and end it
    afterwards, also when the test fails."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while (info := find_mount(str(mountpoint))) is None or info.source != fsname:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, f"{fsname} did not mount"
            time.sleep(0.02)
        yield
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_synced(path: str | os.PathLike[str], data: bytes, offset: int) -> None:
    """``data`` written into the (mounted) file at ``offset`` and fsync()ed: through the
    mount's write and flush paths down to the image."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
