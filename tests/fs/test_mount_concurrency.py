"""Requests in flight through the real mount (issue 9): the daemon ends cleanly when the mount
goes away under busy readers and writers, survives a reader killed in the middle of a slow read,
and a cold random read at queue depth 16 keeps at least 8 host reads in flight.

Every daemon logs to a file (``--log-file``), which must hold no traceback and no error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.concurrency import copy_image, use_engine
from tests.support.images import qemu_img
from tests.support.mount import force_unmount, mounted, vdiskfs, wait_gone
from tests.support.slowfs import slow_mount
from tests.support.workload import assert_clean
from vdiskfs.fs.mount import find_mount

pytestmark = pytest.mark.mount

MiB = 1 << 20
FIO = shutil.which("fio")


#: What pyfuse3 logs when the kernel no longer waits for a reply (the connection was aborted):
#: the daemon carries on, so this error is expected where a test aborts, from any handler that
#: was still working (a write; a getattr waiting for its fstat).
REPLY_TO_ABORTED = re.compile(
    r"ERROR pyfuse3: fuse_\w+\(\): fuse_reply_\* failed with No such file or directory$")


def _assert_log_clean(log: Path, *, expected: re.Pattern[str] | None = None) -> None:
    text = log.read_text() if log.exists() else ""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines()
             if expected is None or not expected.search(line)]
    bad = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    assert not bad, text


def _stats(mnt: Path, export: str) -> dict[str, dict[str, object]]:
    """Every stats file of ``export``, by name (``0-qcow2``, ``1-file``...)."""
    directory = mnt / "stats" / export
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.iterdir())
            if p.name != "tree"}


def _assert_idle(mnt: Path, export: str, timeout: float = 10) -> None:
    """No request in flight in any node of the export (once those abandoned have ended)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(mnt, export)
        busy = {name: (s["in_flight"], s.get("engine_in_flight", 0))
                for name, s in stats.items() if s["in_flight"] or s.get("engine_in_flight")}
        if not busy:
            return
        assert time.monotonic() < deadline, f"still in flight: {busy}"
        time.sleep(0.05)


def _fio(*args: str, runtime: float) -> subprocess.Popen[str]:
    assert FIO is not None
    return subprocess.Popen([FIO, "--output-format=json", "--ioengine=libaio", "--direct=1",
                             "--time_based", f"--runtime={runtime}", "--group_reporting",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc`` and its descendants (fio runs each job in a process and session of
    its own)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _daemon_mount(image: Path, mnt: Path, log: Path, *options: str) -> Iterator[int]:
    """Mount with a log file; yields the daemon's pid. Whatever happens, nothing stays
    mounted or running afterwards."""
    mnt.mkdir(parents=True, exist_ok=True)
    vdiskfs("mount", "--log-file", log, *options, image, mnt)
    info = find_mount(str(mnt))
    assert info is not None and info.daemon_pid is not None
    try:
        yield info.daemon_pid
    finally:
        force_unmount(mnt)


# -- the mount going away under busy readers and writers ------------------------------------------


def _end_mount(how: str, mnt: Path, pid: int, fio: subprocess.Popen[str]) -> None:
    info = find_mount(str(mnt))
    assert info is not None and info.device is not None
    if how == "lazy-unmount":
        # The readers keep the connection until they close their files, and the command waits
        # for the daemon to end: kill the readers while it waits.
        unmount = subprocess.Popen([sys.executable, "-m", "vdiskfs", "unmount", "--lazy",
                                    str(mnt)], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while find_mount(str(mnt)) is not None:
            assert time.monotonic() < deadline, "the lazy unmount did not detach the mount"
            time.sleep(0.02)
        _kill_tree(fio)
        _out, err = unmount.communicate(timeout=30)
        assert unmount.returncode == 0, err
    elif how == "sigterm":
        os.kill(pid, signal.SIGTERM)
    else:  # "abort": fusectl fails every request at once, as the kernel does on a fatal error
        minor = info.device.partition(":")[2]
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


@pytest.mark.skipif(FIO is None, reason="needs fio")
@pytest.mark.parametrize("how", ["lazy-unmount", "sigterm", "abort"])
def test_mount_ends_under_busy_readers_and_writers(variant_templates: dict[str, Path],
                                                   how: str, tmp_path: Path) -> None:
    image = copy_image(variant_templates, "qcow2", tmp_path)
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    with _daemon_mount(image.path, mnt, log, "--rw", "--format", "qcow2") as pid:
        fio = _fio(f"--filename={mnt / 'disk.raw'}", "--name=r", "--rw=randread", "--bs=4k",
                   "--iodepth=16", "--numjobs=2", "--name=w", "--rw=randwrite",
                   "--bs=12k", "--iodepth=8", runtime=20)
        try:
            # Until both kinds of request are being served.
            deadline = time.monotonic() + 10
            while True:
                stats = _stats(mnt, "disk")["0-qcow2"]
                if stats["rd_operations"] > 100 and stats["wr_operations"] > 100:
                    break
                assert fio.poll() is None, fio.communicate()
                assert time.monotonic() < deadline, stats
                time.sleep(0.05)
            _end_mount(how, mnt, pid, fio)
            assert wait_gone(pid, timeout=20), f"the daemon did not end after {how}"
        finally:
            _kill_tree(fio)
            fio.communicate()
    _assert_log_clean(log, expected=REPLY_TO_ABORTED if how == "abort" else None)
    # Closed cleanly: every write that the daemon took reached the image, metadata too.
    assert_clean(image.path, "qcow2")
    assert "closed all images" in log.read_text()


# -- a reader killed in the middle of a slow read -------------------------------------------------

#: Reads 64 KiB at argv[2] of argv[1] with O_DIRECT (into page-aligned memory).
_READER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
area = mmap.mmap(-1, 65536)
print("reading", flush=True)
os.preadv(fd, [area], int(sys.argv[2]))
"""


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
def test_reader_killed_during_a_slow_read(variant_templates: dict[str, Path], engine: str,
                                          tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The image sits on a slow file system: a reader killed with SIGKILL while the daemon
    waits for the host leaves the daemon healthy -- later reads are right, nothing stays in
    flight, the unmount is clean."""
    use_engine(monkeypatch, engine)  # the daemon inherits it
    image = copy_image(variant_templates, "qcow2", tmp_path)
    reference = image.reference.read_bytes()
    control = tmp_path / "delay"
    control.write_text("0")
    log = tmp_path / "daemon.log"
    with slow_mount(image.path.parent, tmp_path / "slow", control) as slow:
        mnt = tmp_path / "mnt"
        with _daemon_mount(slow / image.path.name, mnt, log, "--format", "qcow2") as pid:
            control.write_text("1.0")
            readers = [subprocess.Popen([sys.executable, "-c", _READER, str(mnt / "disk.raw"),
                                         str(offset)], stdout=subprocess.PIPE, text=True)
                       for offset in (1 * MiB, 3 * MiB, 5 * MiB + 65536)]
            for reader in readers:
                assert reader.stdout is not None and reader.stdout.readline() == "reading\n"
            time.sleep(0.3)  # the daemon now waits for the slow host
            busy = _stats(mnt, "disk")
            assert busy["0-qcow2"]["in_flight"] > 0, busy
            for reader in readers:
                reader.kill()
            for reader in readers:
                assert reader.wait(10) == -signal.SIGKILL
            control.write_text("0")
            _assert_idle(mnt, "disk")
            assert (mnt / "disk.raw").read_bytes() == reference
            stats = _stats(mnt, "disk")
            assert stats["1-file"]["io_engine"] == engine
            assert stats["0-qcow2"]["failed_rd_operations"] == 0
            vdiskfs("unmount", mnt)
            assert wait_gone(pid)
    _assert_log_clean(log)


# -- queue depth reaching the host ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(FIO is None, reason="needs fio")
@pytest.mark.parametrize("engine", ["io_uring", "threads"])
def test_cold_random_reads_at_depth_16_keep_8_host_reads_in_flight(
        engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9's acceptance: a cold 4 KiB random read at queue depth 16 through the mount shows
    at least 8 host reads in flight at once in the ``file`` node's statistics."""
    use_engine(monkeypatch, engine)
    raw = tmp_path / "data.raw"
    with open(raw, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    raw.unlink()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    log = tmp_path / "daemon.log"
    with mounted(image, mountpoint=tmp_path / "mnt",
                 options=("--format", "qcow2", "--log-file", str(log))) as mnt:
        fio = _fio(f"--filename={mnt / 'disk.raw'}", "--name=qd16", "--rw=randread",
                   "--bs=4k", "--iodepth=16", "--randrepeat=0", runtime=3)
        out, err = fio.communicate(timeout=60)
        assert fio.returncode == 0, err
        file = _stats(mnt, "disk")["1-file"]
        assert file["io_engine"] == engine
        assert file["max_in_flight"] >= 8, file
        assert file["engine_max_in_flight"] >= 8, file
        _assert_idle(mnt, "disk")
        iops = json.loads(out)["jobs"][0]["read"]["iops"]
        assert iops > 0
    _assert_log_clean(log)
