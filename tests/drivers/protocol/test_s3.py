"""The s3 protocol node against radosgw on the throwaway Ceph cluster (tests.support.ceph,
tests.support.s3): the qcow2 read corpus and an image of every other format uploaded to a
bucket read as ``qemu-img convert`` reads the local file; the conformance battery; wrong keys,
a missing object and a missing bucket as clear errors; the secret key shown nowhere."""

from __future__ import annotations

import argparse
import errno
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.drivers.protocol.test_http import OTHER_FORMATS, _read_all
from tests.support.conformance import check_block_node
from tests.support.images import create, qemu_img, qemu_io, random_bytes, reference_raw
from tests.support.qcow2_images import RECIPES, Qcow2Images
from tests.support.s3 import S3Store
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.drivers.protocol.http.node import HttpNode, opened
from vdiskfs.drivers.protocol.s3 import S3Config, S3Error, S3Node
from vdiskfs.errors import UnsupportedError, VdiskError

pytestmark = pytest.mark.ceph

MiB = 1 << 20


@pytest.fixture
def s3(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """The store, with the environment pointing vdiskfs at it (and no profile files)."""
    for name, value in s3_store.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    return s3_store


@pytest.fixture(scope="module")
def raw_disk(s3_store: S3Store) -> bytes:
    data = random_bytes(17, 3 * MiB + 4321)
    s3_store.put("disk.raw", data)
    return data


@pytest.fixture(scope="module")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2-s3"))


async def _open(url: str) -> HttpNode:
    return await opened(S3Node(url, S3Config.from_environment()), OpenOptions())


async def test_conformance_over_s3(s3: S3Store, raw_disk: bytes) -> None:
    await check_block_node(lambda: _open(s3.url("disk.raw")), raw_disk)


async def test_open_image_by_s3_url(s3: S3Store, raw_disk: bytes) -> None:
    node = await open_image(s3.url("disk.raw"), OpenOptions(format="raw"))
    async with node:
        assert [n.driver for _, _, n in node.walk()] == ["raw", "cache", "s3"]
        s3_node = node.child("file").child("file")  # type: ignore[union-attr]
        assert isinstance(s3_node, S3Node)
        assert s3_node.label == "s3://vdiskfs/disk.raw"
        assert s3_node.etag is not None
        assert await _read_all(node) == raw_disk
        assert s3_node.counters.bytes_fetched == len(raw_disk)
    with pytest.raises(VdiskError, match="read-only") as info:
        await open_image(s3.url("disk.raw"), OpenOptions(read_only=False))
    assert info.value.errno == errno.EROFS


@pytest.mark.parametrize("name", sorted(RECIPES))
async def test_qcow2_corpus_by_s3_url(s3: S3Store, qcow2_images: Qcow2Images,
                                      name: str) -> None:
    """Every image of the qcow2 read corpus, its backing and data files in the bucket too
    (relative names resolve against the image's s3:// URL)."""
    image = qcow2_images.get(name)
    s3.put_tree(f"qcow2/{name}", image.path.parent)
    node = await open_image(s3.url(f"qcow2/{name}/{image.path.relative_to(image.path.parent)}"))
    async with node:
        assert node.driver == "qcow2"
        assert await _read_all(node) == image.reference
        for _depth, _role, child in node.walk():
            if child.kind == "protocol":
                assert child.driver == "s3", child
                assert child.label.startswith(f"s3://vdiskfs/qcow2/{name}/")


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
async def test_other_formats_by_s3_url(s3: S3Store, fmt: str, tmp_path: Path) -> None:
    source = create(tmp_path / "source.qcow2", "6M")
    qemu_io(source, "write -P 0x5a 0 1M", "write -P 0xa5 3M 1536k", "write -z 5M 64k")
    driver = fmt.partition("-")[0]
    local = tmp_path / fmt / f"disk.{driver}"
    local.parent.mkdir()
    qemu_img("convert", "-O", driver, *OTHER_FORMATS[fmt], source, local)
    reference = reference_raw(local, tmp_path / "ref.raw", fmt=driver).read_bytes()
    s3.put_tree(f"formats/{fmt}", local.parent)
    node = await open_image(s3.url(f"formats/{fmt}/disk.{driver}"))
    async with node:
        assert node.driver == driver
        assert await _read_all(node) == reference


async def test_missing_object_and_bucket(s3: S3Store, raw_disk: bytes) -> None:
    with pytest.raises(S3Error, match=r"^s3://vdiskfs/no/such\.qcow2: no object 'no/such\.qcow2' "
                       r"in bucket 'vdiskfs' \[S3 error NoSuchKey, HTTP 404\]") as info:
        await _open(s3.url("no/such.qcow2"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(S3Error, match=r"^s3://nobucket/disk\.raw: no bucket 'nobucket' on "
                       r"http://127\.0\.0\.1:\d+ \(us-east-1\) \[S3 error NoSuchBucket, "
                       r"HTTP 404\]") as info:
        await _open(s3.url("disk.raw", bucket="nobucket"))
    assert info.value.errno == errno.ENOENT


async def test_wrong_credentials(s3: S3Store, raw_disk: bytes,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + s3.secret_key)
    with pytest.raises(S3Error, match=r"^s3://vdiskfs/disk\.raw: the secret key does not match "
                       r"the access key \(access key id \*\*\*\*SKEY from the environment\) "
                       r"\[S3 error SignatureDoesNotMatch, HTTP 403\]") as info:
        await _open(s3.url("disk.raw"))
    assert info.value.errno == errno.EACCES
    assert s3.secret_key not in str(info.value) and s3.access_key not in str(info.value)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHACCESSKEY12345")
    with pytest.raises(S3Error, match=r"the server knows no such access key \(access key id "
                       r"\*\*\*\*2345 from the environment\) \[S3 error InvalidAccessKeyId, "
                       r"HTTP 403\]") as info:
        await _open(s3.url("disk.raw"))
    assert info.value.errno == errno.EACCES

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(S3Error, match=r"access to object 'disk\.raw' in bucket 'vdiskfs' denied "
                       r"\(no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                       r"AWS_PROFILE\) \[S3 error AccessDenied, HTTP 403\]"):
        await _open(s3.url("disk.raw"))


async def test_credentials_from_a_profile(s3: S3Store, raw_disk: bytes, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_PROFILE picks a profile of the credentials file; the config file gives its region
    and endpoint."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "AWS_REGION"):
        monkeypatch.delenv(name)
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = WRONGWRONGWRONG\n"
                           f"aws_secret_access_key = wrong\n\n[rgw]\n"
                           f"aws_access_key_id = {s3.access_key}\n"
                           f"aws_secret_access_key = {s3.secret_key}\n")
    config = tmp_path / "config"
    config.write_text(f"[profile rgw]\nregion = us-east-1\nendpoint_url = {s3.endpoint}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "rgw")
    node = await _open(s3.url("disk.raw"))
    async with node:
        assert await node.pread(MiB, 4096) == raw_disk[MiB:MiB + 4096]
        assert node.info() == {"filename": "s3://vdiskfs/disk.raw", "endpoint": s3.endpoint,
                               "region": "us-east-1", "access_key": "****SKEY"}


async def test_object_replaced_while_open(s3: S3Store) -> None:
    s3.put("changing.raw", random_bytes(1, MiB))
    node = await _open(s3.url("changing.raw"))
    async with node:
        await node.pread(0, 4096)
        s3.put("changing.raw", random_bytes(2, MiB))
        with pytest.raises(VdiskError, match=r"s3://vdiskfs/changing\.raw: .*changed on the "
                           "server since it was opened") as info:
            await node.pread(4096, 4096)
        assert info.value.errno == errno.EIO


async def test_concurrent_reads(s3: S3Store, raw_disk: bytes) -> None:
    node = await _open(s3.url("disk.raw"))
    results: dict[int, bytes] = {}

    async def read(i: int) -> None:
        results[i] = bytes(await node.pread(i * 40000, 70000))

    async with node:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(32):
                    nursery.start_soon(read, i)
        for i in range(32):
            assert results[i] == raw_disk[i * 40000:i * 40000 + 70000]
        assert node.counters.connections_opened > 1


async def test_secret_shown_nowhere(s3: S3Store, raw_disk: bytes) -> None:
    """Neither the secret key nor the access key id appears in labels, stats or ``info``; the
    access key id only as its last four characters."""
    node = await open_image(s3.url("disk.raw"), OpenOptions(format="raw"))
    async with node:
        await node.pread(0, 4096)
        shown = [str(node), repr(node)]
        for _depth, _role, child in node.walk():
            shown += [child.label, repr(child), str(child.info()),
                      str(child.stats_snapshot().as_dict())]
        for text in shown:
            assert s3.secret_key not in text and s3.access_key not in text, text
    proc = subprocess.run([sys.executable, "-m", "vdiskfs", "info", "--json",
                           s3.url("disk.raw")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "s3://vdiskfs/disk.raw" in proc.stdout
    output = proc.stdout + proc.stderr
    assert s3.secret_key not in output and s3.access_key not in output


async def test_refused_uses(s3: S3Store, raw_disk: bytes, tmp_path: Path) -> None:
    """No overlay over an s3 object (QEMU could not open the URL it would record), no
    writable boot disk."""
    from emulator.cli import parse_disk
    from vdiskfs.overlay import open_overlay

    with pytest.raises(UnsupportedError, match=r"overlay=\) over an s3 image is not supported"):
        await open_overlay(s3.url("disk.raw"), str(tmp_path / "new.qcow2"), OpenOptions())
    assert not (tmp_path / "new.qcow2").exists()
    assert parse_disk(s3.url("disk.raw")).read_only
    with pytest.raises(argparse.ArgumentTypeError, match="readonly=off: s3 images are read-only"):
        parse_disk(f"{s3.url('disk.raw')},readonly=off")


async def test_chain_in_the_bucket(s3: S3Store, tmp_path: Path) -> None:
    """Backing names resolve against the image's key, an absolute one from the bucket's root
    (never a local file); --no-follow-outside keeps them under the image's prefix."""
    chain = tmp_path / "chain"
    chain.mkdir()
    create(chain / "base.qcow2", "2M")
    qemu_io(chain / "base.qcow2", "write -P 0x11 0 1M")
    create(chain / "top.qcow2", "2M", backing="base.qcow2", backing_fmt="qcow2")
    reference = reference_raw(chain / "top.qcow2", tmp_path / "ref.raw").read_bytes()
    s3.put_tree("chain", chain)
    for name, backing in (("outside", "../chain/base.qcow2"), ("absolute", "/chain/base.qcow2")):
        # -u: the names are meant for the bucket, not for this machine.
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
                 tmp_path / f"{name}.qcow2", "2M")
        s3.put(f"elsewhere/{name}.qcow2", tmp_path / f"{name}.qcow2")

    node = await open_image(s3.url("chain/top.qcow2"))
    async with node:
        assert await _read_all(node) == reference
        backing = node.child("backing")
        assert backing is not None and backing.label == "s3://vdiskfs/chain/base.qcow2"
    for name in ("outside", "absolute"):
        node = await open_image(s3.url(f"elsewhere/{name}.qcow2"))
        async with node:
            assert node.child("backing").label == "s3://vdiskfs/chain/base.qcow2"  # type: ignore[union-attr]
        with pytest.raises(VdiskError, match="outside the image's directory"):
            await open_image(s3.url(f"elsewhere/{name}.qcow2"),
                             OpenOptions(follow_outside=False))


async def test_local_overlay_over_an_s3_object(s3: S3Store, raw_disk: bytes,
                                               tmp_path: Path) -> None:
    """A local image may name an s3:// object as its backing file: followed (with a warning
    that reads go over the network), refused by --no-follow-outside."""
    top = tmp_path / "top.qcow2"
    create(top, len(raw_disk))
    qemu_io(top, "write -P 0x33 64k 64k")  # one whole cluster
    # Written first: QEMU cannot open an s3:// backing file.
    qemu_img("rebase", "-u", "-b", s3.url("disk.raw"), "-F", "raw", top)
    expected = bytearray(raw_disk)
    expected[64 * 1024:128 * 1024] = b"\x33" * (64 * 1024)
    warnings: list[str] = []
    node = await open_image(str(top), OpenOptions(warn=warnings.append))
    async with node:
        # The overlay's size is rounded up to sectors: past the backing file it reads zeros.
        expected += bytes(node.size - len(raw_disk))
        assert await _read_all(node) == expected
        assert node.child("backing").label == s3.url("disk.raw")  # type: ignore[union-attr]
    assert any("s3://vdiskfs/disk.raw is remote" in w for w in warnings), warnings
    with pytest.raises(VdiskError, match="network URL"):
        await open_image(str(top), OpenOptions(follow_outside=False))
