"""vdiskfs's own FUSE session (vdiskfs/fs/session.py) against pyfuse3's, and its protocol
structs against the sizes in linux/fuse.h."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.mount import mounted
from vdiskfs.fs import fuse_abi as abi
from vdiskfs.fs import session as session_module
from vdiskfs.fs.mount import find_mount
from vdiskfs.fs.operations import VdiskOperations
from vdiskfs.fs.session import FSTYPE, FuseSession

MiB = 1 << 20


def test_struct_sizes_match_linux_fuse_h() -> None:
    # sizeof() of each struct in include/uapi/linux/fuse.h (protocol 7.31).
    sizes = {
        abi.IN_HEADER: 40, abi.OUT_HEADER: 16, abi.INIT_OUT: 64, abi.ATTR: 88,
        abi.ENTRY_OUT: 40, abi.ATTR_OUT: 16, abi.GETATTR_IN: 16, abi.SETATTR_IN: 88,
        abi.OPEN_IN: 8, abi.OPEN_OUT: 16, abi.READ_IN: 40, abi.WRITE_IN: 40, abi.WRITE_OUT: 8,
        abi.RELEASE_IN: 24, abi.FLUSH_IN: 24, abi.FSYNC_IN: 16, abi.STATFS_OUT: 80,
        abi.FALLOCATE_IN: 32, abi.LSEEK_IN: 24, abi.LSEEK_OUT: 8, abi.DIRENT: 24,
    }
    for layout, size in sizes.items():
        assert layout.size == size, (layout.format, size)


def _image(path: Path) -> Path:
    """A qcow2 with data at the start, a hole, data at 3 MiB, and a GPT partition."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["sgdisk", "-n", "1:2048:+2M", str(raw)], check=True, capture_output=True)
    with open(raw, "r+b") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    return raw


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.mount
@pytest.mark.parametrize("session", ["own", "pyfuse3"])
def test_both_sessions_serve_the_same_files(tmp_path: Path, session: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if session == "pyfuse3":
        monkeypatch.setenv("VDISKFS_FUSE", "pyfuse3")
    else:
        monkeypatch.delenv("VDISKFS_FUSE", raising=False)
    image = tmp_path / "disk.qcow2"
    raw = _image(image)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw",)) as mnt:
        assert sorted(os.listdir(mnt)) == ["disk-part1.raw", "disk.raw", "stats"]
        assert sorted(os.listdir(mnt / "stats" / "disk")) == ["0-qcow2", "1-file", "tree"]
        st = os.stat(mnt / "disk.raw")
        assert stat.S_ISREG(st.st_mode) and st.st_size == 8 * MiB
        assert _sha(mnt / "disk.raw") == _sha(raw)
        with open(mnt / "disk.raw", "r+b") as f:
            # Holes and data from the block status (LSEEK), a write, and write-zeroes
            # (FALLOCATE): the requests pyfuse3 only passes on with the project's patch.
            fd = f.fileno()
            assert os.lseek(fd, 3 * MiB - 4096, os.SEEK_DATA) == 3 * MiB
            assert os.lseek(fd, 3 * MiB, os.SEEK_HOLE) == 4 * MiB
            os.pwrite(fd, b"x" * 5000, 5 * MiB + 100)
            subprocess.run(["fallocate", "--punch-hole", "--offset", str(3 * MiB),
                            "--length", str(MiB), str(mnt / "disk.raw")], check=True)
            os.fsync(fd)
            assert os.pread(fd, 5000, 5 * MiB + 100) == b"x" * 5000
            assert os.pread(fd, MiB, 3 * MiB) == bytes(MiB)
        with pytest.raises(OSError) as info:
            os.truncate(mnt / "disk.raw", MiB)
        assert info.value.errno == errno.EPERM
        assert os.statvfs(mnt).f_blocks > 0
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.mount
def test_the_fusermount3_path_hands_back_the_connection(tmp_path: Path) -> None:
    """Where mount(2) is refused (not root), fusermount3 mounts and passes the /dev/fuse
    descriptor back over a socket; here as root, on the session itself, without serving: the
    descriptor holds the kernel's INIT request, and closing the session unmounts."""
    if shutil.which("fusermount3") is None:
        pytest.skip("no fusermount3")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = FuseSession(VdiskOperations([]), str(mnt), read_only=True, allow_other=False)
    session._fd = session._mount_with_fusermount("vdiskfs:test")
    session._connected = True
    try:
        info = find_mount(str(mnt), resolve=False)
        assert info is not None and info.fstype == FSTYPE and info.source == "vdiskfs:test"
        request = os.read(session._fd, session_module.BUFFER_SIZE)
        assert abi.IN_HEADER.unpack_from(request)[1] == abi.Opcode.INIT
    finally:
        session.close()
    assert find_mount(str(mnt), resolve=False) is None
