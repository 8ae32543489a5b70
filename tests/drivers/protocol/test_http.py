"""The http/https protocol node against nginx (tests.support.http_server) and broken servers:
images read by URL as ``qemu-img convert`` reads the local file, the connection pool, TLS
verification, servers that ignore ranges, files replaced while open, credentials that never
show, servers that never answer."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.support.conformance import check_block_node
from tests.support.http_server import (
    PASSWORD,
    USER,
    Nginx,
    flaky_server,
    ignoring_range_server,
)
from tests.support.images import create, qemu_img, qemu_io, random_bytes, reference_raw
from tests.support.qcow2_images import RECIPES, Qcow2Images
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, opened
from vdiskfs.block.registry import url_scheme
from vdiskfs.drivers.protocol.http import HttpError, HttpNode, open_http, redact_url
from vdiskfs.errors import UnsupportedError, VdiskError
from vdiskfs.overlay import open_overlay

MiB = 1 << 20

OTHER_FORMATS = {
    "vmdk": ["-o", "subformat=monolithicSparse"],
    "vmdk-extents": ["-o", "subformat=twoGbMaxExtentSparse"],
    "vpc": ["-o", "subformat=dynamic"],
    "vhdx": [],
    "vdi": [],
    "qed": [],
}


async def _read_all(node: BlockNode, chunk: int = MiB) -> bytes:
    parts = []
    for offset in range(0, node.size, chunk):
        parts.append(bytes(await node.pread(offset, min(chunk, node.size - offset))))
    return b"".join(parts)


async def _open(url: str, **kwargs: object) -> HttpNode:
    return await opened(HttpNode(url, **kwargs))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def raw_disk(nginx: Nginx) -> bytes:
    data = random_bytes(7, 3 * MiB + 12345)
    (nginx.root / "disk.raw").write_bytes(data)
    return data


@pytest.fixture(scope="module")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2-http"))


def test_url_scheme_and_redaction() -> None:
    assert url_scheme("https://host/x.qcow2") == "https"
    assert url_scheme("HTTP://host/x") == "http"
    assert url_scheme("./https:/x") is None
    assert redact_url("https://u:pw@h:8443/a?b=c") == "https://u:***@h:8443/a?b=c"
    assert redact_url("https://h/a") == "https://h/a"
    assert redact_url("https://:pw@h/a") == "https://***@h/a"


async def test_conformance_over_http(nginx: Nginx, raw_disk: bytes) -> None:
    await check_block_node(lambda: _open(nginx.url("disk.raw")), raw_disk)


async def test_https_with_the_ca_file(nginx: Nginx, raw_disk: bytes) -> None:
    node = await _open(nginx.url("disk.raw", tls=True), ca_file=str(nginx.ca_file))
    async with node:
        assert node.size == len(raw_disk)
        assert await _read_all(node) == raw_disk
        assert node.counters.bytes_fetched == len(raw_disk)
        assert await node.allocated_size() == len(raw_disk)


async def test_https_refused_without_the_ca(nginx: Nginx, raw_disk: bytes) -> None:
    url = nginx.url("disk.raw", tls=True)
    with pytest.raises(HttpError, match=r"127\.0\.0\.1.*TLS certificate verification failed"
                       ".*--ca-file"):
        await _open(url)
    # Opting out works, for the user who asks.
    node = await _open(url, verify_tls=False)
    async with node:
        assert await node.pread(0, 4096) == raw_disk[:4096]


async def test_open_image_by_url_probes_the_format(nginx: Nginx, raw_disk: bytes) -> None:
    node = await open_image(nginx.url("disk.raw", tls=True),
                            OpenOptions(ca_file=str(nginx.ca_file), format="raw"))
    async with node:
        assert node.driver == "raw"
        cache = node.child("file")
        assert cache is not None and cache.driver == "cache"
        assert cache.child("file").driver == "http"  # type: ignore[union-attr]
        assert await _read_all(node) == raw_disk
        assert cache.counters.bytes_fetched == len(raw_disk)  # type: ignore[attr-defined]
        assert await _read_all(node) == raw_disk  # the second pass from the cache
        assert cache.counters.bytes_fetched == len(raw_disk)  # type: ignore[attr-defined]
    node = await open_image(nginx.url("disk.raw"), OpenOptions(format="raw", cache=False))
    async with node:
        assert [n.driver for _, _, n in node.walk()] == ["raw", "http"]
    with pytest.raises(VdiskError, match="read-only") as info:
        await open_image(nginx.url("disk.raw"), OpenOptions(read_only=False))
    assert info.value.errno == errno.EROFS


@pytest.mark.parametrize("name", sorted(RECIPES))
async def test_qcow2_corpus_by_url(nginx: Nginx, qcow2_images: Qcow2Images, name: str) -> None:
    """Every image of the qcow2 read corpus, its backing files and data files on the server
    too (relative names resolve against the image's URL)."""
    image = qcow2_images.get(name)
    served = nginx.root / "qcow2" / name
    shutil.copytree(image.path.parent, served)
    url = nginx.url(f"qcow2/{name}/{image.path.relative_to(image.path.parent)}")
    node = await open_image(url)
    async with node:
        assert node.driver == "qcow2"
        assert await _read_all(node) == image.reference
        for _depth, _role, child in node.walk():
            if child.kind == "protocol":
                assert child.driver == "http", child


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
async def test_other_formats_by_url(nginx: Nginx, fmt: str, tmp_path: Path) -> None:
    source = create(tmp_path / "source.qcow2", "6M")
    qemu_io(source, "write -P 0x5a 0 1M", "write -P 0xa5 3M 1536k", "write -z 5M 64k")
    driver = fmt.partition("-")[0]
    served = nginx.root / "formats" / fmt / f"disk.{driver}"
    served.parent.mkdir(parents=True)
    qemu_img("convert", "-O", driver, *OTHER_FORMATS[fmt], source, served)
    reference = reference_raw(served, tmp_path / "ref.raw", fmt=driver).read_bytes()
    node = await open_image(nginx.url(f"formats/{fmt}/disk.{driver}", tls=True),
                            OpenOptions(ca_file=str(nginx.ca_file)))
    async with node:
        assert node.driver == driver
        assert await _read_all(node) == reference


async def test_refused_uses(nginx: Nginx, tmp_path: Path) -> None:
    url = nginx.url("disk.raw", credentials=f"{USER}:{PASSWORD}@")
    with pytest.raises(UnsupportedError, match=r"overlay=\) over an http\(s\) image") as info:
        await open_overlay(url, str(tmp_path / "new.qcow2"), OpenOptions())
    assert PASSWORD not in str(info.value)
    assert not (tmp_path / "new.qcow2").exists()
    with pytest.raises(HttpError, match="cannot load the CA file"):
        HttpNode(nginx.url("disk.raw", tls=True), ca_file=str(tmp_path / "missing.pem"))


async def test_concurrent_reads_use_the_pool(nginx: Nginx, raw_disk: bytes) -> None:
    node = await _open(nginx.url("disk.raw"), max_connections=4)
    rng = random.Random(3)
    ranges = [(rng.randrange(0, len(raw_disk) - 70000), rng.randrange(1, 70000))
              for _ in range(64)]
    results: dict[int, bytes] = {}

    async def read(i: int, offset: int, length: int) -> None:
        results[i] = bytes(await node.pread(offset, length))

    async with node:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, (offset, length) in enumerate(ranges):
                    nursery.start_soon(read, i, offset, length)
        for i, (offset, length) in enumerate(ranges):
            assert results[i] == raw_disk[offset:offset + length]
        counters = node.counters
        # How many overlap depends on nginx's speed: a request whose answer is already in the
        # socket when it reads completes without waiting (so without letting another start).
        # test_queue_depth_is_not_serial_round_trips checks the depth with a slow server.
        assert 1 <= counters.connections_opened <= 4
        assert counters.requests == 65  # HEAD + one GET per read
        snapshot = node.stats_snapshot().as_dict()
        assert snapshot["connections_opened"] == counters.connections_opened


async def test_queue_depth_is_not_serial_round_trips() -> None:
    """16 reads at once from a server that takes 0.3 s per answer go over the pool's 8
    connections at once (the server sees 8 in flight), not one after the other."""
    data = random_bytes(6, MiB)
    stats: dict[str, int] = {}
    with flaky_server(data, delay=0.3, stats=stats) as base:
        node = await _open(f"{base}/disk.raw")
        async with node:
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(node.pread, i * 4096, 4096)
            assert node.counters.connections_opened == 8
    # Serial round trips would show 1; a loaded machine may open the last connections after
    # the first answers came back, so not necessarily all 8.
    assert stats["most_in_flight"] >= 4, stats


async def test_redirect_followed(nginx: Nginx, raw_disk: bytes) -> None:
    node = await _open(nginx.url("redirect/disk.raw"))
    async with node:
        assert node.counters.redirects == 1
        assert await node.pread(100, 1000) == raw_disk[100:1100]


async def test_missing_file(nginx: Nginx) -> None:
    with pytest.raises(HttpError, match="404") as info:
        await _open(nginx.url("nothing-here.raw"))
    assert info.value.errno == errno.ENOENT


async def test_server_without_ranges_refused_at_open() -> None:
    with ignoring_range_server(b"x" * 10000, accept_ranges=False) as base, \
            pytest.raises(HttpError, match="does not support byte ranges") as info:
        await _open(f"{base}/disk.raw")
    assert info.value.errno == errno.ENOTSUP


async def test_server_ignoring_range_refused_at_read() -> None:
    with ignoring_range_server(b"x" * 100000, accept_ranges=True) as base:
        node = await _open(f"{base}/disk.raw")
        async with node:
            with pytest.raises(HttpError, match="ignores Range"):
                await node.pread(4096, 512)
            # The 100000-byte body was not read.
            assert node.counters.bytes_fetched < 100000


@pytest.mark.parametrize("mode", ["drop", "truncate"])
async def test_lost_connections_retried(mode: str) -> None:
    data = random_bytes(5, 200000)
    with flaky_server(data, failures=2, mode=mode) as base:
        node = await _open(f"{base}/disk.raw")
        async with node:
            with trio.fail_after(10):
                assert await node.pread(1000, 50000) == data[1000:51000]
            assert node.counters.retries == 2
        # One failure more than the retries: EIO naming the URL, after 4 attempts.
    with flaky_server(data, failures=4, mode=mode) as base:
        node = await _open(f"{base}/disk.raw")
        async with node:
            with trio.fail_after(10), pytest.raises(HttpError, match=r"127\.0\.0\.1.*"
                                                    "connection lost.*4 attempts") as info:
                await node.pread(0, 50000)
            assert info.value.errno == errno.EIO
            assert await node.pread(0, 100) == data[:100]  # the next request works again


async def test_cancelled_reads_leave_the_pool_usable(nginx: Nginx, raw_disk: bytes) -> None:
    node = await _open(nginx.url("disk.raw"), max_connections=2)
    async with node:
        # Cancel reads at every point of their exchange: connecting, sending, in the body.
        for delay in (0, 0.0005, 0.001, 0.002, 0.005):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(node.pread, i * 100000, 3 * MiB - i * 100000)
                await trio.sleep(delay)
                nursery.cancel_scope.cancel()
        assert node.stats_snapshot().in_flight == 0
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(node.pread, 0, MiB)
            assert await node.pread(12345, 100000) == raw_disk[12345:112345]


async def test_file_replaced_while_open(nginx: Nginx, tmp_path: Path) -> None:
    path = nginx.root / "changing.raw"
    path.write_bytes(random_bytes(1, MiB))
    node = await _open(nginx.url("changing.raw"))
    async with node:
        assert node.etag is not None
        await node.pread(0, 4096)
        # Replaced by a file of the same size: only the validators can tell.
        new = tmp_path / "new.raw"
        new.write_bytes(random_bytes(2, MiB))
        st = path.stat()
        os.utime(new, (st.st_atime + 10, st.st_mtime + 10))
        os.replace(new, path)
        with pytest.raises(HttpError, match=r"http://127\.0\.0\.1:\d+/changing\.raw: "
                           ".*changed on the server since it was opened") as info:
            await node.pread(4096, 4096)
        assert info.value.errno == errno.EIO


async def test_credentials_used_and_never_shown(nginx: Nginx, raw_disk: bytes) -> None:
    (nginx.root / "private" / "disk.raw").write_bytes(raw_disk)
    with pytest.raises(HttpError, match="401") as info:
        await _open(nginx.url("private/disk.raw"))
    assert info.value.errno == errno.EACCES

    url = nginx.url("private/disk.raw", credentials=f"{USER}:{PASSWORD}@")
    node = await open_image(url, OpenOptions(format="raw"))
    async with node:
        assert await node.pread(0, 4096) == raw_disk[:4096]
        file = node.child("file")
        assert file is not None
        shown = [str(node), repr(node), node.label, file.label, repr(file),
                 str(file.stats_snapshot().as_dict())]
        for text in shown:
            assert PASSWORD not in text
        assert f"{USER}:***@" in node.label

    wrong = nginx.url("private/disk.raw", credentials=f"{USER}:wrong-{PASSWORD}@")
    with pytest.raises(HttpError) as info:
        await _open(wrong)
    assert PASSWORD not in str(info.value)

    # info prints the URL redacted, and neither nginx's logs nor the output show the password.
    proc = subprocess.run([sys.executable, "-m", "vdiskfs", "info", "--json", url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    assert f"{USER}:***@" in proc.stdout
    assert PASSWORD not in nginx.log_text()


async def test_chain_with_credentials(nginx: Nginx, tmp_path: Path) -> None:
    """The backing file of an image opened by URL is fetched with the same credentials; no
    label or error shows them; --no-follow-outside keeps the chain in the image's directory."""
    chain = nginx.root / "private" / "chain"
    chain.mkdir()
    create(chain / "base.qcow2", "2M")
    qemu_io(chain / "base.qcow2", "write -P 0x11 0 1M")
    create(chain / "top.qcow2", "2M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(chain / "top.qcow2", "write -P 0x22 512k 64k")
    reference = reference_raw(chain / "top.qcow2", tmp_path / "ref.raw").read_bytes()
    url = nginx.url("private/chain/top.qcow2", credentials=f"{USER}:{PASSWORD}@")
    node = await open_image(url)
    async with node:
        assert await _read_all(node) == reference
        backing = node.child("backing")
        assert backing is not None
        assert backing.label == nginx.url("private/chain/base.qcow2",
                                          credentials=f"{USER}:***@")

    outside = nginx.root / "private" / "outside"
    outside.mkdir()
    create(outside / "top.qcow2", "2M", backing="../chain/top.qcow2", backing_fmt="qcow2")
    with pytest.raises(VdiskError, match="outside the image's directory"):
        await open_image(nginx.url("private/outside/top.qcow2",
                                   credentials=f"{USER}:{PASSWORD}@"),
                         OpenOptions(follow_outside=False))

    (chain / "base.qcow2").unlink()
    with pytest.raises(VdiskError, match=r"backing file 'base\.qcow2' not found") as info:
        await open_image(url)
    assert PASSWORD not in str(info.value)


async def test_credentials_from_netrc(nginx: Nginx, raw_disk: bytes, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (nginx.root / "private" / "disk.raw").write_bytes(raw_disk)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    node = await _open(nginx.url("private/disk.raw"))
    async with node:
        assert await node.pread(0, 512) == raw_disk[:512]


async def test_server_that_never_answers_times_out() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _hold_forever, 0,
                                                host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            with pytest.raises(HttpError, match=r"timed out after 0\.5 s") as info:
                await _open(f"http://127.0.0.1:{port}/disk.raw", timeout=0.5)
        assert info.value.errno == errno.ETIMEDOUT
        nursery.cancel_scope.cancel()


async def _hold_forever(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def test_connection_refused_after_retries() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with trio.fail_after(10), pytest.raises(HttpError, match=r"connection lost.*4 attempts"):
        await open_http(f"http://127.0.0.1:{port}/x.raw", OpenOptions())


async def test_cache_dir_serves_the_second_open(nginx: Nginx, raw_disk: bytes,
                                                tmp_path: Path) -> None:
    """--cache-dir: the second open of a URL reads the blocks from the cache files, which no
    name or byte of shows the URL's credentials."""
    (nginx.root / "private" / "cached.raw").write_bytes(raw_disk)
    url = nginx.url("private/cached.raw", credentials=f"{USER}:{PASSWORD}@")
    options = OpenOptions(format="raw", cache_dir=str(tmp_path / "cache"))
    for attempt in range(2):
        node = await open_image(url, options)
        async with node:
            assert await _read_all(node) == raw_disk
            http = next(n for _, _, n in node.walk() if n.driver == "http")
            fetched = http.counters.bytes_fetched  # type: ignore[attr-defined]
            assert fetched == (len(raw_disk) if attempt == 0 else 0)
    for path in (tmp_path / "cache").iterdir():
        assert USER not in path.name and PASSWORD not in path.name
        if path.suffix == ".map":
            assert PASSWORD.encode() not in path.read_bytes()
