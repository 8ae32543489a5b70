"""The nbd protocol node against real servers (qemu-nbd, nbdkit): reads byte for byte,
block status as ``qemu-img map`` sees it, formats probed on top, writes that qemu-img checks,
and servers that die or hang (an error within the timeout, never a hang or wrong bytes)."""

from __future__ import annotations

import errno
import json
import random
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.support.conformance import check_block_node
from tests.support.holes import status_runs
from tests.support.images import create, qemu_img, qemu_io, random_bytes, run
from tests.support.nbd import NBDKIT, make_tls_certificates, nbdkit, qemu_nbd
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockStatus
from vdiskfs.drivers.filter.cache import CacheNode
from vdiskfs.drivers.protocol.nbd import NbdNode, wire
from vdiskfs.errors import HostIOError, NoSpaceError, ReadOnlyError, VdiskError


async def _open(url: str, read_only: bool = True) -> NbdNode:
    node = NbdNode(url, read_only=read_only)
    await node.open()
    return node


def _guest_bytes(image: Path, fmt: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.ref"
    qemu_img("convert", "-f", fmt, "-O", "raw", image, out)
    return out.read_bytes()


@pytest.fixture
def sparse_qcow2(tmp_path: Path) -> Path:
    """Data, zero clusters, discarded clusters and never-written ones (64 MiB)."""
    image = create(tmp_path / "sparse.qcow2", "64M")
    qemu_io(image, "write -P 0xab 1M 192k", "write -z 4M 1M", "write -P 0x11 9M 64k",
            "discard 9M 32k", "write -P 0x5a 63M 1M", "write -P 0x01 20M 1", fmt="qcow2")
    return image


async def test_conformance_writable_raw(tmp_path: Path) -> None:
    data = random_bytes(1, 2 * 1024 * 1024 + 512)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw", writable=True) as server:
        await check_block_node(lambda: _open(server.url, read_only=False), data, writable=True)


async def test_conformance_writable_raw_under_the_cache(tmp_path: Path) -> None:
    """The cache filter (what an http URL opens under its format) over the nbd node, reads
    and writes at once."""
    data = random_bytes(4, 2 * 1024 * 1024 + 512)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)

    async def open_cached() -> CacheNode:
        node = CacheNode(await _open(server.url, read_only=False), block_size=64 << 10,
                         max_bytes=1 << 20)
        await node.open()
        return node

    with qemu_nbd(path, "raw", writable=True) as server:
        await check_block_node(open_cached, data, writable=True)


async def test_no_cache_over_an_export(tmp_path: Path) -> None:
    """No cache filter over nbd (QEMU puts none either: the server answers from its page
    cache), so --cache-dir keeps nothing of it -- an export can change unseen anyway."""
    data = random_bytes(5, 1 << 20)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw") as server:
        root = await open_image(server.url, OpenOptions(format="raw",
                                                        cache_dir=str(tmp_path / "cache")))
        async with root:
            assert await root.pread(0, len(data)) == data
            protocol = root.child("file")
            assert protocol is not None and protocol.driver == "nbd"
    assert not (tmp_path / "cache").exists()


async def test_the_filter_keeps_no_disk_cache_of_an_export(tmp_path: Path) -> None:
    """A cache filter put over nbd by hand: memory only (no validator to key a file by)."""
    data = random_bytes(5, 1 << 20)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw") as server:
        node = await _open(server.url)
        cache = CacheNode(node, cache_dir=str(tmp_path / "cache"))
        await cache.open()
        async with cache:
            assert await cache.pread(0, len(data)) == data
            assert cache.info()["on_disk"] is False
    assert not (tmp_path / "cache").exists()


async def test_conformance_read_only_unaligned_size(tmp_path: Path) -> None:
    data = random_bytes(2, 1024 * 1024 + 77)
    path = tmp_path / "odd.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw") as server:
        # qemu-nbd 7.2 exports a raw file rounded up to 512 bytes, the tail reading as zeros.
        padded = data + bytes(-len(data) % 512)
        await check_block_node(lambda: _open(server.url), padded)
        with pytest.raises(ReadOnlyError, match="exports it read-only"):
            await _open(server.url, read_only=False)


async def test_qcow2_export_byte_for_byte(tmp_path: Path, sparse_qcow2: Path) -> None:
    reference = _guest_bytes(sparse_qcow2, "qcow2", tmp_path)
    with qemu_nbd(sparse_qcow2, "qcow2") as server:
        node = await _open(server.url)
        try:
            assert node.size == len(reference)
            chunk = 1 << 22
            for offset in range(0, node.size, chunk):
                assert await node.pread(offset, chunk) == reference[offset : offset + chunk]
            # Many reads at once on the one connection, all correct.
            rng = random.Random(3)
            ranges = [(rng.randrange(node.size), rng.randrange(1, 1 << 20)) for _ in range(200)]
            ranges = [(o, min(n, node.size - o)) for o, n in ranges]
            got: dict[int, bytes] = {}

            async def read(i: int, offset: int, length: int) -> None:
                got[i] = bytes(await node.pread(offset, length))

            async with trio.open_nursery() as nursery:
                for i, (offset, length) in enumerate(ranges):
                    nursery.start_soon(read, i, offset, length)
            for i, (offset, length) in enumerate(ranges):
                assert got[i] == reference[offset : offset + length], (offset, length)
            assert node.counters.max_requests_in_flight > 1
        finally:
            await node.aclose()


def _sparse_raw(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(32 << 20)
        for offset in (0, 1 << 20, 5 << 20, (32 << 20) - 4096):
            f.seek(offset)
            f.write(b"\x99" * 65536 if offset < 31 << 20 else b"\x99" * 4096)
    return path


@pytest.mark.parametrize("server", ["qemu-nbd qcow2", "qemu-nbd raw", "nbdkit file"])
async def test_block_status_matches_qemu_img_map(server: str, sparse_qcow2: Path,
                                                 tmp_path: Path) -> None:
    """Walking the whole export by block status gives the runs ``qemu-img map`` gives for
    the same export (data and zero flags; adjacent runs alike merged, as qemu-img does)."""
    if server == "nbdkit file" and NBDKIT is None:
        pytest.skip("needs nbdkit (scripts/setup.sh installs it)")
    raw = _sparse_raw(tmp_path / "sparse.raw")
    with (qemu_nbd(sparse_qcow2, "qcow2") if server == "qemu-nbd qcow2"
          else qemu_nbd(raw, "raw") if server == "qemu-nbd raw"
          else nbdkit("file", str(raw))) as srv:
        theirs = [(e["start"], e["length"], e["data"], e["zero"])
                  for e in json.loads(qemu_img("map", "--output=json", srv.url))]
        node = await _open(srv.url)
        try:
            assert node.info()["block_status"]
            assert await status_runs(node) == theirs
            assert len(theirs) > 3
            # The server describes several extents per reply: later runs came from those.
            assert node.counters.block_status_cached > 0
        finally:
            await node.aclose()


async def test_qcow2_probed_over_nbd_and_unix_socket(tmp_path: Path,
                                                     sparse_qcow2: Path) -> None:
    """The qcow2 file exported as raw bytes: our qcow2 driver opens on top of the nbd node."""
    reference = _guest_bytes(sparse_qcow2, "qcow2", tmp_path)
    with qemu_nbd(sparse_qcow2, "raw", unix=tmp_path / "nbd.sock") as server:
        assert server.url.startswith("nbd+unix:///disk?socket=")
        root = await open_image(server.url)
        try:
            assert root.driver == "qcow2"
            assert [n.driver for _, _, n in root.walk()] == ["qcow2", "nbd"]
            assert await root.pread(0, root.size) == reference
            status, run = await root.block_status(4 << 20, 1 << 20)
            assert status & BlockStatus.ZERO and run == 1 << 20
        finally:
            await root.aclose()


async def test_writes_through_qemu_nbd_pass_qemu_img_check(tmp_path: Path,
                                                           sparse_qcow2: Path) -> None:
    """Our raw writes, zeroes and trims through a writable qemu-nbd into a qcow2; then
    qemu-img check is clean and the guest bytes are the model's."""
    model = bytearray(_guest_bytes(sparse_qcow2, "qcow2", tmp_path))
    rng = random.Random(4)
    with qemu_nbd(sparse_qcow2, "qcow2", writable=True) as server:
        node = await _open(server.url, read_only=False)
        try:
            for _ in range(30):
                offset = rng.randrange(len(model) - 300_000)
                data = rng.randbytes(rng.randrange(1, 300_000))
                await node.pwrite(offset, data)
                model[offset : offset + len(data)] = data
            await node.zero(1 << 20, 128 << 10)
            model[1 << 20 : (1 << 20) + (128 << 10)] = bytes(128 << 10)
            await node.zero(63 << 20, 1 << 20, may_unmap=True)
            model[63 << 20 : 64 << 20] = bytes(1 << 20)
            await node.discard(30 << 20, 1 << 20)
            model[30 << 20 : 31 << 20] = await node.pread(30 << 20, 1 << 20)
            await node.flush()
            assert await node.pread(0, node.size) == model
        finally:
            await node.aclose()
    run("qemu-img", "check", sparse_qcow2)
    assert _guest_bytes(sparse_qcow2, "qcow2", tmp_path) == model


async def test_qcow2_written_through_nbd_passes_qemu_img_check(tmp_path: Path) -> None:
    """Our qcow2 driver allocating clusters in a file exported raw by qemu-nbd."""
    image = create(tmp_path / "grow.qcow2", "16M")
    copy = tmp_path / "copy.qcow2"
    run("cp", image, copy)
    # qemu-nbd cannot grow a raw export: give the file room first.
    run("truncate", "-s", "8M", image)
    run("truncate", "-s", "8M", copy)
    with qemu_nbd(image, "raw", writable=True) as server:
        root = await open_image(server.url, OpenOptions(read_only=False, format="qcow2"))
        try:
            await root.pwrite(1 << 20, b"\x42" * (256 << 10))
            await root.pwrite(9 << 20, b"\x17" * 4096)
            await root.flush()
        finally:
            await root.aclose()
    qemu_io(copy, "write -P 0x42 1M 256k", "write -P 0x17 9M 4k", fmt="qcow2")
    run("qemu-img", "check", image)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", image, copy)


async def test_missing_export_and_refused_connection(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(65536))
    with qemu_nbd(path, "raw") as server:
        with pytest.raises(HostIOError, match=r"export 'nope'.*no such export") as info:
            await _open(server.url.replace("/disk", "/nope"))
        assert info.value.errno == errno.ENOENT
        url = server.url
    with pytest.raises(HostIOError, match="cannot connect") as info:
        await _open(url)
    assert info.value.errno == errno.ECONNREFUSED


async def test_server_killed_mid_run_fails_cleanly(tmp_path: Path) -> None:
    data = random_bytes(5, 8 << 20)
    path = tmp_path / "d.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw") as server:
        node = await _open(server.url + "?x-timeout=2")
        try:
            assert await node.pread(0, 4096) == data[:4096]
            errors: list[VdiskError] = []

            async def reader(offset: int) -> None:
                try:
                    got = await node.pread(offset, 1 << 20)
                except VdiskError as exc:
                    errors.append(exc)
                else:
                    assert got == data[offset : offset + (1 << 20)]  # never wrong bytes

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for i in range(16):
                        nursery.start_soon(reader, (i % 8) << 20)
                    await trio.sleep(0)
                    server.kill()
                with pytest.raises(HostIOError, match="reconnecting failed") as info:
                    await node.pread(0, 4096)
            assert info.value.errno == errno.EIO
            assert "nbd://127.0.0.1" in str(info.value) and "refused" in str(info.value)
            assert all(e.errno == errno.EIO for e in errors)
        finally:
            with trio.fail_after(5):
                await node.aclose()


async def test_reconnects_after_a_restart(tmp_path: Path) -> None:
    data = random_bytes(6, 4 << 20)
    path = tmp_path / "d.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw") as server:
        node = await _open(server.url)
        try:
            assert await node.pread(0, 4096) == data[:4096]
            server.kill()
            server.start()
            with trio.fail_after(10):
                assert await node.pread(1 << 20, 1 << 20) == data[1 << 20 : 2 << 20]
            assert node.counters.reconnects == 1 and node.counters.retried == 1
        finally:
            await node.aclose()


async def test_hung_server_times_out(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(1 << 20))
    with qemu_nbd(path, "raw") as server:
        node = await _open(server.url + "?x-timeout=0.5")
        try:
            assert server.proc is not None
            server.kill(signal.SIGSTOP)
            with trio.fail_after(10), pytest.raises(HostIOError) as info:
                await node.pread(0, 4096)
            assert info.value.errno in (errno.EIO, errno.ETIMEDOUT)
            assert "within 0.5 s" in str(info.value)
        finally:
            with trio.fail_after(5):
                await node.aclose()


@pytest.mark.skipif(NBDKIT is None, reason="needs nbdkit (scripts/setup.sh installs it)")
async def test_nbdkit_memory_and_file(tmp_path: Path) -> None:
    with nbdkit("memory", "8M") as server:
        node = await _open(server.url, read_only=False)
        try:
            assert node.size == 8 << 20
            await node.pwrite(4096, b"hello")
            assert await node.pread(4090, 16) == bytes(6) + b"hello" + bytes(5)
            await node.zero(0, 8 << 20, may_unmap=True)
            status, run = await node.block_status(0, node.size)
            assert status & BlockStatus.ZERO and run == node.size
        finally:
            await node.aclose()
    data = random_bytes(7, 3 << 20)
    path = tmp_path / "f.raw"
    path.write_bytes(data)
    with nbdkit("file", str(path)) as server:
        await check_block_node(lambda: _open(server.url, read_only=False), data, writable=True)


@pytest.mark.skipif(NBDKIT is None, reason="needs nbdkit (scripts/setup.sh installs it)")
async def test_server_block_size_constraints(tmp_path: Path) -> None:
    """A server that refuses (EINVAL) every request not aligned to 4 KiB or longer than
    64 KiB: reads are widened, writes read-modify-written, long requests split."""
    data = random_bytes(8, 3 << 20)
    path = tmp_path / "f.raw"
    path.write_bytes(data)
    with nbdkit("file", str(path), "blocksize-minimum=4096", "blocksize-maximum=65536",
                "blocksize-error-policy=error", filters=("blocksize-policy",)) as server:
        node = await _open(server.url, read_only=False)
        try:
            info = node.info()
            assert (info["min_block"], info["max_payload"]) == (4096, 65536)
        finally:
            await node.aclose()
        await check_block_node(lambda: _open(server.url, read_only=False), data, writable=True)
        # Many small writes into the same blocks at once: none undoes another.
        node = await _open(server.url, read_only=False)
        try:
            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(node.pwrite, 8192 + i * 100, bytes([i + 1]) * 100)
            expected = b"".join(bytes([i + 1]) * 100 for i in range(64))
            assert await node.pread(8192, 6400) == expected
        finally:
            await node.aclose()


@pytest.mark.skipif(NBDKIT is None, reason="needs nbdkit (scripts/setup.sh installs it)")
async def test_server_errors_keep_their_errno(tmp_path: Path) -> None:
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(1 << 20))
    trigger = tmp_path / "fail"
    with nbdkit("file", str(path), "error-pwrite=ENOSPC", "error-pwrite-rate=1",
                f"error-pwrite-file={trigger}", "error-pread=EIO", "error-pread-rate=1",
                f"error-pread-file={trigger}", filters=("error",)) as server:
        node = await _open(server.url, read_only=False)
        try:
            await node.pwrite(4096, b"ok")
            trigger.touch()
            with pytest.raises(NoSpaceError, match=r"offset 0x2000: write of 2 bytes failed"):
                await node.pwrite(8192, b"no")
            with pytest.raises(HostIOError, match=r"nbd://127.0.0.1:\d+/: .*read of 512") as exc:
                await node.pread(0, 512)
            assert exc.value.errno == errno.EIO
            trigger.unlink()  # the connection survives errors: the next request works
            assert await node.pread(4096, 2) == b"ok"
            assert node.counters.reconnects == 0
        finally:
            await node.aclose()


async def test_local_qcow2_overlay_over_an_nbd_base(tmp_path: Path,
                                                    sparse_qcow2: Path) -> None:
    """A qcow2 overlay whose backing file is an nbd:// URL: made by qemu-img and read by us,
    and made by ``open_overlay`` (``mount --overlay``), written, and checked by qemu-img."""
    from vdiskfs.overlay import open_overlay

    base = _guest_bytes(sparse_qcow2, "qcow2", tmp_path)
    with qemu_nbd(sparse_qcow2, "qcow2") as server:
        theirs = create(tmp_path / "theirs.qcow2", "64M", backing=server.url, backing_fmt="raw")
        qemu_io(theirs, "write -P 0xcd 2M 64k", fmt="qcow2")
        expected = _guest_bytes(theirs, "qcow2", tmp_path)
        root = await open_image(str(theirs))
        try:
            assert [(r, n.driver) for _, r, n in root.walk()] == [
                ("", "qcow2"), ("file", "file"), ("backing", "raw"), ("file", "nbd")]
            assert await root.pread(0, root.size) == expected
        finally:
            await root.aclose()
        with pytest.raises(VdiskError, match=r"network URL.*no-follow-outside"):
            await open_image(str(theirs), OpenOptions(follow_outside=False))

        ours = tmp_path / "ours.qcow2"
        options = OpenOptions(format="raw")
        for attempt in range(2):  # created, then continued
            node = await open_overlay(server.url, str(ours), options)
            try:
                await node.pwrite((2 << 20) + attempt * 4096, b"\xcd" * 4096)
                await node.flush()
            finally:
                await node.aclose()
        run("qemu-img", "check", ours)
        info = json.loads(qemu_img("info", "--output=json", ours))
        assert info["backing-filename"] == server.url
        assert info["backing-filename-format"] == "raw"
        model = bytearray(base)
        model[2 << 20 : (2 << 20) + 8192] = b"\xcd" * 8192
        assert _guest_bytes(ours, "qcow2", tmp_path) == model


async def test_cancelled_requests_leave_the_connection_usable(tmp_path: Path) -> None:
    """Readers cancelled at every point of their requests (while waiting for a slot, sending,
    or waiting for the reply): later reads on the same connection get exactly their bytes."""
    data = random_bytes(9, 16 << 20)
    path = tmp_path / "d.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw") as server:
        node = await _open(server.url)
        try:
            rng = random.Random(10)
            for round_ in range(20):
                with trio.move_on_after(rng.choice((0, 0.0005, 0.002, 0.01))):
                    async with trio.open_nursery() as nursery:
                        for _ in range(40):
                            nursery.start_soon(node.pread, rng.randrange(15 << 20), 1 << 20)
                offset = rng.randrange(15 << 20)
                assert await node.pread(offset, 1 << 20) == data[offset : offset + (1 << 20)], (
                    round_)
            assert node.counters.reconnects == 0
        finally:
            await node.aclose()


# -- a server that breaks the protocol -------------------------------------------------------


async def _fake_server(stream: trio.SocketStream, answer: Callable[[int, int, int], bytes],
                       *, old: bool = False) -> None:
    """Handshake as a read-only 1 MiB export with base:allocation, then answer each request
    (cookie, offset, length) with ``answer``'s bytes. ``old``: a server that knows only
    ``NBD_OPT_EXPORT_NAME`` (and sends the 124 zeroes)."""
    buf = bytearray()

    async def read(n: int) -> bytes:
        while len(buf) < n:
            chunk = await stream.receive_some()
            if not chunk:
                raise trio.EndOfChannel
            buf.extend(chunk)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def reply(option: int, kind: int, payload: bytes = b"") -> bytes:
        return struct.pack(">QIII", wire.OPTION_REPLY_MAGIC, option, kind,
                           len(payload)) + payload

    try:
        await stream.send_all(struct.pack(">QQH", wire.NBDMAGIC, wire.IHAVEOPT,
                                          1 if old else 3))
        await read(4)
        while True:
            _, option, length = struct.unpack(">QII", await read(16))
            await read(length)
            if option == wire.OPT_EXPORT_NAME:
                await stream.send_all(struct.pack(">QH", 1 << 20, wire.FLAG_HAS_FLAGS)
                                      + bytes(124))
                break
            if old:
                await stream.send_all(reply(option, wire.REP_ERR_UNSUP))
            elif option == wire.OPT_STRUCTURED_REPLY:
                await stream.send_all(reply(option, wire.REP_ACK))
            elif option == wire.OPT_SET_META_CONTEXT:
                await stream.send_all(reply(option, wire.REP_META_CONTEXT,
                                            struct.pack(">I", 1) + b"base:allocation")
                                      + reply(option, wire.REP_ACK))
            elif option == wire.OPT_GO:
                await stream.send_all(reply(option, wire.REP_INFO, struct.pack(
                    ">HQH", wire.INFO_EXPORT, 1 << 20, wire.FLAG_HAS_FLAGS | wire.FLAG_READ_ONLY))
                    + reply(option, wire.REP_ACK))
                break
        while True:
            _, _, command, cookie, offset, length = wire.REQUEST.unpack(await read(28))
            if command == wire.CMD_DISC:
                break
            await stream.send_all(answer(cookie, offset, length))
    except (trio.EndOfChannel, trio.BrokenResourceError):
        pass


def _chunk(cookie: int, kind: int, payload: bytes, done: bool = True) -> bytes:
    return struct.pack(">IHHQI", wire.STRUCTURED_REPLY_MAGIC, int(done), kind, cookie,
                       len(payload)) + payload


@pytest.mark.parametrize("case", ["bad magic", "outside the request", "short read",
                                  "unknown cookie", "simple reply to a read"])
async def test_protocol_violations_fail_the_request_never_wrong_bytes(case: str) -> None:
    def answer(cookie: int, offset: int, length: int) -> bytes:
        if case == "bad magic":
            return b"\xde\xad\xbe\xef" * 5
        if case == "outside the request":
            return _chunk(cookie, wire.REPLY_TYPE_OFFSET_DATA,
                          struct.pack(">Q", offset + 1) + b"x" * length)
        if case == "short read":
            return _chunk(cookie, wire.REPLY_TYPE_OFFSET_DATA,
                          struct.pack(">Q", offset) + b"x" * (length - 1))
        if case == "unknown cookie":
            return _chunk(cookie + 1, wire.REPLY_TYPE_NONE, b"")
        return struct.pack(">IIQ", wire.SIMPLE_REPLY_MAGIC, 0, cookie) + b"x" * length

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            trio.serve_tcp, lambda s: _fake_server(s, answer), 0)
        port = listeners[0].socket.getsockname()[1]
        url = f"nbd://127.0.0.1:{port}/x?x-timeout=5"
        node = await _open(url)
        try:
            with trio.fail_after(5), pytest.raises(VdiskError) as info:
                await node.pread(4096, 512)
            assert info.value.errno == errno.EIO
            assert url in str(info.value)
            assert node.counters.reconnects == 0  # a broken server is not retried
        finally:
            await node.aclose()
        nursery.cancel_scope.cancel()


async def test_old_server_export_name_and_simple_replies() -> None:
    """A server without NBD_OPT_GO or structured replies: NBD_OPT_EXPORT_NAME, simple
    replies, and block status from the BlockNode default (everything data)."""
    pattern = bytes(i % 251 for i in range(1 << 20))

    def answer(cookie: int, offset: int, length: int) -> bytes:
        return (struct.pack(">IIQ", wire.SIMPLE_REPLY_MAGIC, 0, cookie)
                + pattern[offset : offset + length])

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            trio.serve_tcp, lambda s: _fake_server(s, answer, old=True), 0)
        port = listeners[0].socket.getsockname()[1]
        node = await _open(f"nbd://127.0.0.1:{port}/")
        try:
            assert node.size == 1 << 20
            assert not node.info()["block_status"]
            assert await node.pread(1000, 70_000) == pattern[1000:71_000]
            got = await node.pread(0, node.size)
            assert got == pattern
            status, run = await node.block_status(0, node.size)
            assert status & BlockStatus.DATA and run == node.size
        finally:
            await node.aclose()
        nursery.cancel_scope.cancel()


async def test_tls(tmp_path: Path) -> None:
    """nbds:// to a qemu-nbd that requires TLS (and a client certificate): verified against
    tls-certificates' CA, by IP and by tls-hostname; refused with the wrong CA unless
    tls-verify-peer=0; a plain nbd:// is told to use TLS, and a server without TLS refused."""
    certs = make_tls_certificates(tmp_path / "pki")
    other = make_tls_certificates(tmp_path / "other")
    data = random_bytes(11, 2 << 20)
    path = tmp_path / "d.raw"
    path.write_bytes(data)
    with qemu_nbd(path, "raw", writable=True, tls=certs) as server:
        assert server.url.startswith("nbds://127.0.0.1:")
        url = f"{server.url}?tls-certificates={certs}"
        await check_block_node(lambda: _open(url, read_only=False), data, writable=True)
        node = await _open(url + "&tls-hostname=localhost")
        await node.aclose()
        # Our client certificate, but another CA: the server's certificate is not trusted,
        # unless verification is off.
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        for name, source in (("ca-cert.pem", other), ("client-cert.pem", certs),
                             ("client-key.pem", certs)):
            (mixed / name).write_bytes((source / name).read_bytes())
        with pytest.raises(HostIOError, match="certificate") as info:
            await _open(f"{server.url}?tls-certificates={mixed}")
        assert info.value.errno == errno.EACCES
        node = await _open(f"{server.url}?tls-certificates={mixed}&tls-verify-peer=0")
        await node.aclose()
        with pytest.raises(HostIOError, match=r"requires TLS.*nbds://") as info:
            await _open(server.url.replace("nbds://", "nbd://"))
    with qemu_nbd(path, "raw") as plain, pytest.raises(
            HostIOError, match="TLS was required but the server refused it"):
        await _open(plain.url.replace("nbd://", "nbds://") + f"?tls-certificates={certs}")


async def test_cached_extents_never_outlive_a_write(tmp_path: Path) -> None:
    """Block status answered from an earlier reply's extents, until a write, zero or
    discard changes the export (also one running while the status request was out)."""
    raw = _sparse_raw(tmp_path / "sparse.raw")
    with qemu_nbd(raw, "raw", writable=True) as server:
        node = await _open(server.url, read_only=False)
        try:
            status, run = await node.block_status(0, node.size)
            assert status & BlockStatus.DATA and run == 65536
            status, run = await node.block_status(2 << 20, 1 << 20)  # a hole, from the cache
            assert status & BlockStatus.ZERO and not status & BlockStatus.DATA
            assert node.counters.block_status_cached == 1
            await node.pwrite(2 << 20, b"x" * 4096)
            status, _ = await node.block_status(2 << 20, 1 << 20)
            assert status & BlockStatus.DATA
            await node.zero(0, 65536, may_unmap=True)
            status, _ = await node.block_status(0, 65536)
            assert status & BlockStatus.ZERO
            # A status request with a write in flight does not fill the cache.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.pwrite, 8 << 20, b"y" * (4 << 20))
                await trio.sleep(0)
                await node.block_status(8 << 20, 1 << 20)
            status, _ = await node.block_status((12 << 20) - 4096, 4096)
            assert status & BlockStatus.DATA
        finally:
            await node.aclose()
