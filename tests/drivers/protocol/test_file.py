"""The file protocol node: conformance, holes, zeroing, growth, and QEMU-compatible locking."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.conformance import check_block_node
from tests.support.images import create, random_bytes
from vdiskfs.block.node import BlockStatus
from vdiskfs.drivers.protocol import file as file_module
from vdiskfs.drivers.protocol.file import FileNode
from vdiskfs.errors import HostIOError, LockedError, NotADiskError


async def _open(path: Path, read_only: bool = True) -> FileNode:
    node = FileNode(str(path), read_only=read_only)
    await node.open()
    return node


async def test_conformance(tmp_path: Path) -> None:
    data = random_bytes(1, 2 * 1024 * 1024 + 77)
    path = tmp_path / "f"
    path.write_bytes(data)
    await check_block_node(lambda: _open(path), data)


async def test_holes_zero_and_growth(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 4096)
    node = await _open(path, read_only=False)
    try:
        status, run = await node.block_status(0, node.size)
        assert status & BlockStatus.ZERO and run == 1 << 20
        status, run = await node.block_status(1 << 20, node.size - (1 << 20))
        assert status & BlockStatus.DATA and run >= 4096
        await node.zero(1 << 20, 4096)
        assert await node.pread(1 << 20, 4096) == bytes(4096)
        # A writable file grows when written past its end (a qcow2 allocating clusters).
        assert node.growable
        await node.pwrite(node.size + 10, b"tail")
        assert node.size == (4 << 20) + 14
        await node.zero(node.size, 100)  # zeroing past the end extends with a hole
        assert node.size == (4 << 20) + 114
        await node.flush()
        assert node.counters.sync_calls == 1
        assert node.counters.syscalls >= node.counters.pread_calls + node.counters.pwrite_calls
    finally:
        await node.aclose()
    assert path.stat().st_size == (4 << 20) + 114


async def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(HostIOError, match=r"missing.*No such file"):
        await _open(tmp_path / "missing")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return create(tmp_path / "locked.qcow2", "1M")


def _qemu_io_write(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-c", "write 0 4k", str(path)], capture_output=True,
                          text=True)


async def test_reader_blocks_qemu_writer(image: Path) -> None:
    node = await _open(image)
    try:
        proc = _qemu_io_write(image)
        assert proc.returncode != 0 and 'Failed to get "write" lock' in proc.stderr
    finally:
        await node.aclose()
    assert _qemu_io_write(image).returncode == 0  # released on close


async def test_second_writer_refused_reader_warned(image: Path) -> None:
    writer = await _open(image, read_only=False)
    try:
        with pytest.raises(LockedError, match=r'locked\.qcow2.*"write" lock'):
            await _open(image, read_only=False)
        reader = await _open(image)
        assert reader.lock_warning is not None and "another process" in reader.lock_warning
        await reader.aclose()
        proc = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
        assert proc.returncode != 0 and "lock" in proc.stderr
    finally:
        await writer.aclose()


@pytest.fixture
def qemu_writer(image: Path, tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--blockdev", "driver=qcow2,node-name=q,file=f",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=q,writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        yield image
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def test_qemu_writer_refuses_our_writer_and_warns_our_reader(qemu_writer: Path) -> None:
    with pytest.raises(LockedError, match="another process"):
        await _open(qemu_writer, read_only=False)
    reader = await _open(qemu_writer)
    try:
        assert reader.lock_warning is not None
    finally:
        await reader.aclose()


async def test_zero_past_the_end_never_cuts_off_a_write_in_flight(tmp_path: Path) -> None:
    """``size`` counts completed writes only; a write in flight beyond it (here: one that
    landed, its completion not yet seen) must survive zeroing past ``size``. ftruncate to grow
    the file cut such writes off (found by concurrent qcow2 allocations at the end of a file)."""
    path = tmp_path / "f"
    path.write_bytes(b"a" * 4096)
    node = await _open(path, read_only=False)
    try:
        with open(path, "r+b") as f:  # the write "in flight": on the file, not in node.size
            f.seek(1 << 20)
            f.write(b"b" * 4096)
        assert node.size == 4096
        await node.zero(8192, 65536)
        assert path.stat().st_size == (1 << 20) + 4096
        with open(path, "rb") as f:
            f.seek(1 << 20)
            assert f.read() == b"b" * 4096
            f.seek(8192)
            assert f.read(65536) == bytes(65536)
    finally:
        await node.aclose()


# -- what is not a disk, and opens that never return (issue 10) -----------------------------------


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
async def test_fifo_refused_without_waiting_for_a_writer(tmp_path: Path, read_only: bool) -> None:
    """Read-only and read-write alike: neither waits for the FIFO's other end."""
    os.mkfifo(tmp_path / "fifo")
    with trio.fail_after(1), pytest.raises(NotADiskError, match="a FIFO") as info:
        await _open(tmp_path / "fifo", read_only=read_only)
    assert info.value.errno == errno.ENODEV and info.value.path == str(tmp_path / "fifo")


async def test_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(NotADiskError, match="a directory") as info:
        await _open(tmp_path)
    assert info.value.errno == errno.EISDIR


async def test_descriptor_is_blocking_again(tmp_path: Path) -> None:
    """Opened O_NONBLOCK, then cleared: io_uring would answer EAGAIN on an O_NONBLOCK file."""
    (tmp_path / "f").write_bytes(b"x" * 4096)
    node = await _open(tmp_path / "f")
    try:
        assert not fcntl.fcntl(node.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        await node.aclose()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_cancelled_open_is_abandoned_and_its_descriptor_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open that hangs (stood for here by a blocking function in place of the system calls;
    tests/fs/test_mount_hostile.py hangs a real one) returns at once when cancelled, and the
    descriptor the thread gets later is closed, not leaked."""
    (tmp_path / "f").write_bytes(b"x" * 4096)
    release, finished = threading.Event(), threading.Event()
    real_open = file_module._open_checked

    def hanging_open(path: str, read_only: bool) -> tuple[int, bool, int]:
        release.wait()
        try:
            return real_open(path, read_only)
        finally:
            finished.set()

    monkeypatch.setattr(file_module, "_open_checked", hanging_open)
    before = _open_fds()
    with trio.move_on_after(0.2) as scope:
        await _open(tmp_path / "f")
    assert scope.cancelled_caught
    release.set()
    await trio.to_thread.run_sync(finished.wait)
    # The thread closes the descriptor right after the open returns.
    with trio.move_on_after(5):
        while _open_fds() != before:
            await trio.sleep(0.01)
    assert _open_fds() == before
