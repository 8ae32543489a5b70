"""``vdiskfs mount`` of images whose children cannot be opened (issue 10): a special file is
refused at once; an open that really blocks -- on a hung file system -- neither keeps a
foreground mount from obeying SIGTERM nor a background mount from giving up.

The hung file system is real, not simulated: a second vdiskfs mount whose daemon is stopped
with SIGSTOP. Every request to it waits in the kernel (``request_wait_answer``) until the daemon
runs again, which is what a dead NFS server or a wedged FUSE daemon does to its clients. Since
the fix, a FIFO no longer blocks an open (O_NONBLOCK), so this is the honest way left to get an
open that blocks; nothing in the code under test is patched or hooked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hostile import patch
from tests.support.images import create, qemu_img, write_pattern_file
from tests.support.mount import force_unmount, mounted, vdiskfs
from vdiskfs.fs.mount import find_mount

pytestmark = pytest.mark.mount

MiB = 1 << 20


@pytest.fixture
def fifo_backed(tmp_path: Path) -> Path:
    """The issue's recipe: a qcow2 whose backing file is a FIFO beside it."""
    image = create(tmp_path / "top.qcow2", MiB)
    patch(image, 0x400, "4s", b"fifo")
    patch(image, 8, ">QI", 0x400, 4)
    os.mkfifo(tmp_path / "fifo")
    return image


def test_background_mount_of_a_fifo_backed_image_fails_at_once(fifo_backed: Path,
                                                               tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    start = time.monotonic()
    proc = vdiskfs("mount", fifo_backed, mnt, check=False, timeout=20)
    elapsed = time.monotonic() - start
    try:
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith(
            f"vdiskfs: {fifo_backed}: field backing_file: backing file 'fifo' "), proc.stderr
        assert "a FIFO (named pipe), not a disk image" in proc.stderr
        assert elapsed < 5, elapsed
        assert find_mount(str(mnt)) is None
    finally:
        force_unmount(mnt)


@pytest.fixture
def on_hung_fs(tmp_path: Path) -> Iterator[Path]:
    """A qcow2 whose backing file lies on a hung file system (a stopped FUSE daemon)."""
    base = write_pattern_file(tmp_path / "base.raw", seed=4, length=MiB)
    hung = tmp_path / "hung"
    with mounted(base, mountpoint=hung, options=("--format", "raw")):
        info = find_mount(str(hung))
        assert info is not None and info.daemon_pid is not None
        top = tmp_path / "top.qcow2"
        # -u: qemu-img must not open the backing file either.
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", hung / "base.raw", "-F", "raw", top,
                 "1M")
        os.kill(info.daemon_pid, signal.SIGSTOP)
        try:
            yield top
        finally:
            # The daemon runs again, answers what waited, and is unmounted by `mounted`.
            os.kill(info.daemon_pid, signal.SIGCONT)


def _waits_on_fuse(pid: int) -> bool:
    """Whether a thread of ``pid`` waits for a FUSE daemon's answer."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/wchan") as f:
                wchan = f.read()
                if "request_wait_answer" in wchan or "fuse" in wchan:
                    return True
    return False


def test_sigterm_ends_a_foreground_mount_stuck_on_a_child_open(on_hung_fs: Path,
                                                               tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdiskfs", "mount", "--foreground", str(on_hung_fs), str(mnt)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _waits_on_fuse(proc.pid):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the mount never reached the hung open"
            time.sleep(0.05)
        # Stuck in the open of the backing file for good: now the signal.
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        # Ends (a hung thread would hold it for ever), without a timing bound to assert.
        status = proc.wait(timeout=10)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert status == 1, stderr
        assert "SIGTERM while opening the images: gave up, nothing mounted" in stderr
        assert "Traceback" not in stderr
        assert find_mount(str(mnt)) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


def _daemons_for(mountpoint: Path) -> list[int]:
    """Pids of vdiskfs daemons whose command line names ``mountpoint``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
            if b"--ready-fd" in b" ".join(argv) and os.fsencode(mountpoint) in argv:
                found.append(int(entry))
    return found


def test_background_mount_gives_up_on_a_hung_child(on_hung_fs: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    start = time.monotonic()
    proc = vdiskfs("mount", "--timeout", "2", on_hung_fs, mnt, check=False, timeout=30)
    elapsed = time.monotonic() - start
    try:
        assert proc.returncode == 1, proc.stderr
        assert "the daemon did not mount within 2 s" in proc.stderr, proc.stderr
        assert "stopped it, nothing mounted" in proc.stderr
        # 2 s of waiting, then SIGTERM ends the daemon within a second (not its 3 s grace).
        assert elapsed < 2 + 1 + 2, elapsed  # + interpreter start-up on a loaded machine
        assert _daemons_for(mnt) == []
        assert find_mount(str(mnt)) is None
    finally:
        force_unmount(mnt)
