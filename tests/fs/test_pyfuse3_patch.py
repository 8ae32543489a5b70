"""The project's pyfuse3 patch (``scripts/pyfuse3/``): lseek and fallocate reach the file
system's Operations, pyfuse3's ENOSYS defaults fall back as the kernel documents, and the INIT
connection limits reach the kernel. Against :mod:`tests.support.recordfs`, a tiny file system
in its own process that records what it is asked."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest

from tests.support.recordfs import EXTENTS, SIZE, RecordingOperations, calls, record_mount
from vdiskfs.fs.capabilities import pyfuse3_has_init_limits, pyfuse3_has_lseek_fallocate

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: The tree setup.sh patched and built pyfuse3 from.
PYFUSE3_TREE = Path(__file__).resolve().parents[2] / ".venv/pyfuse3/pyfuse3-3.5.0"


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate64(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def connection_dir(mountpoint: Path) -> Path:
    """The mount's fusectl directory, named after the kernel's encoding of its device."""
    dev = mountpoint.stat().st_dev
    return Path("/sys/fs/fuse/connections") / str(os.major(dev) << 20 | os.minor(dev))


def test_setup_installed_the_patched_pyfuse3() -> None:
    assert pyfuse3_has_lseek_fallocate(), pyfuse3.__version__
    assert pyfuse3_has_init_limits(), pyfuse3.__version__


def test_an_unpatched_pyfuse3_gets_the_limits_through_fusectl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vdiskfs.fs import mount
    from vdiskfs.fs.operations import VdiskOperations

    connection = tmp_path / "42"  # fusectl's directory of the connection of device 0:42
    connection.mkdir()
    monkeypatch.setattr(mount, "FUSECTL", str(tmp_path))
    mount._raise_max_background("0:42", VdiskOperations([]))
    assert (connection / "max_background").read_text() == "64\n"
    assert (connection / "congestion_threshold").read_text() == "48\n"


@pytest.mark.mount
def test_seek_data_and_seek_hole_come_from_the_file_system(tmp_path: Path) -> None:
    log = tmp_path / "log"
    (first, first_len), (second, second_len) = EXTENTS
    with record_mount(tmp_path / "mnt", log) as path:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == first
            assert os.lseek(fd, first + 1, os.SEEK_DATA) == first + 1
            assert os.lseek(fd, first, os.SEEK_HOLE) == first + first_len
            assert os.lseek(fd, first + first_len, os.SEEK_DATA) == second
            assert os.lseek(fd, second + second_len, os.SEEK_HOLE) == second + second_len
            assert os.lseek(fd, 0, os.SEEK_CUR) == second + second_len
            with pytest.raises(OSError) as exc:
                os.lseek(fd, second + second_len, os.SEEK_DATA)
            assert exc.value.errno == errno.ENXIO
            assert os.lseek(fd, 0, os.SEEK_CUR) == second + second_len  # unchanged
            # SEEK_SET/CUR/END never leave the kernel.
            assert os.lseek(fd, 10, os.SEEK_SET) == 10
            assert os.lseek(fd, 0, os.SEEK_END) == SIZE
        finally:
            os.close(fd)
    fh = calls(log, "lseek")[0]["fh"]
    assert calls(log, "lseek") == [
        {"fh": fh, "off": off, "whence": whence} for off, whence in [
            (0, os.SEEK_DATA), (first + 1, os.SEEK_DATA), (first, os.SEEK_HOLE),
            (first + first_len, os.SEEK_DATA), (second + second_len, os.SEEK_HOLE),
            (second + second_len, os.SEEK_DATA),
        ]
    ]


@pytest.mark.mount
def test_fallocate_reaches_the_file_system(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with record_mount(tmp_path / "mnt", log) as path:
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 65536, 512)
            os.posix_fallocate(fd, 0, 4096)  # mode 0
        finally:
            os.close(fd)
    assert [(c["mode"], c["off"], c["length"]) for c in calls(log, "fallocate")] == [
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192),
        (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 65536, 512),
        (0, 0, 4096),
    ]


@pytest.mark.mount
def test_the_enosys_defaults_fall_back(tmp_path: Path) -> None:
    with record_mount(tmp_path / "mnt", tmp_path / "log", bare=True) as path:
        fd = os.open(path, os.O_RDWR)
        try:
            # The kernel's generic llseek: the whole file is data.
            assert os.lseek(fd, 100, os.SEEK_DATA) == 100
            assert os.lseek(fd, 100, os.SEEK_HOLE) == SIZE
            for _ in range(2):  # the first ENOSYS, then the kernel's remembered refusal
                with pytest.raises(OSError) as exc:
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
                assert exc.value.errno == errno.EOPNOTSUPP
        finally:
            os.close(fd)


@pytest.mark.mount
def test_init_limits_reach_the_kernel(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with record_mount(tmp_path / "mnt", log) as path:
        connection = connection_dir(path.parent)
        if not connection.is_dir():  # vdiskfs mounts fusectl; Debian does not
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connection.parent)],
                           check=True, capture_output=True)
        assert int((connection / "max_background").read_text()) == (
            RecordingOperations.max_background
        )
        assert int((connection / "congestion_threshold").read_text()) == (
            RecordingOperations.congestion_threshold
        )
        dev = path.parent.stat().st_dev
        read_ahead_kb = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert int(read_ahead_kb.read_text()) * 1024 == RecordingOperations.max_readahead
        with path.open("r+b", buffering=0) as f:
            assert f.write(b"x" * (256 << 10)) == 256 << 10
    sizes = [call["size"] for call in calls(log, "write")]
    assert max(sizes) == RecordingOperations.max_write  # 1 MiB without the limit
    assert sum(sizes) == 256 << 10


@pytest.mark.slow
@pytest.mark.mount
def test_the_patched_sdist_passes_its_own_tests() -> None:
    if not (PYFUSE3_TREE / "test").is_dir():
        pytest.skip(f"{PYFUSE3_TREE} is missing: scripts/setup.sh did not build pyfuse3")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test/test_fs.py", "--installed", "-p",
         "no:cacheprovider"],
        cwd=PYFUSE3_TREE, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for name in ("test_lseek", "test_fallocate", "test_max_write", "test_max_background"):
        assert name in proc.stdout
