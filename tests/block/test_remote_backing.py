"""Local images whose backing file is a URL or a QEMU ``json:`` reference (issue 12, item 4),
against real servers: nginx over HTTP and HTTPS (tests.support.http_server) and qemu-nbd. Each
overlay reads byte for byte as ``qemu-img convert`` of it by QEMU itself (for HTTPS with the
test's private CA, which QEMU's curl driver cannot be given, as the local base); the remote
file is named in the warnings; ``--no-follow-outside`` refuses it; credentials show nowhere."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.http_server import PASSWORD, USER, Nginx
from tests.support.images import create, qemu_img, qemu_io, reference_raw
from tests.support.nbd import NbdServer, qemu_nbd
from tests.support.vmdk_images import write_descriptor
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.errors import ChainError, FormatError, UnsupportedError, VdiskError

MiB = 1 << 20
SIZE = "4M"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, nginx: Nginx) -> Path:
    """A qcow2 base with data, served by nginx (also under /private/, which needs a password)."""
    directory = tmp_path_factory.mktemp("remote-base")
    path = create(directory / "base.qcow2", SIZE)
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 2M 512k")
    for where in ("refs", "private/refs"):
        (nginx.root / where).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, nginx.root / where / "base.qcow2")
    return path


@pytest.fixture(scope="module")
def nbd_base(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdServer]:
    """The base's guest bytes exported raw by qemu-nbd over TCP."""
    with qemu_nbd(base, "qcow2") as server:
        yield server


@pytest.fixture(scope="module")
def unix_base(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdServer]:
    """The same over a Unix socket."""
    sock = tmp_path_factory.mktemp("nbd-unix") / "nbd.sock"
    with qemu_nbd(base, "qcow2", unix=sock) as server:
        yield server


def overlay(directory: Path, backing: str, backing_fmt: str, name: str = "top.qcow2",
            fmt: str = "qcow2") -> Path:
    """A local overlay with data of its own over ``backing``, recorded as given (``rebase -u``:
    QEMU does not open it here)."""
    path = create(directory / name, SIZE, fmt=fmt)
    # Whole clusters, written before the image has a backing file: its bytes are not needed.
    qemu_io(path, "write -P 0x33 1M 64k", "write -P 0x44 2M 64k", fmt=fmt)
    qemu_img("rebase", "-q", "-u", "-f", fmt, "-b", backing, "-F", backing_fmt, path)
    return path


def qemu_view(image: Path, directory: Path) -> bytes:
    """What QEMU reads through ``image`` and its remote backing file. One request at a time
    (``-m 1``): QEMU 7.2's curl driver hangs with several in flight (seen here with a qcow2
    base that has data)."""
    out = directory / f"{image.name}.ref"
    qemu_img("convert", "-m", "1", "-O", "raw", image, out)
    return out.read_bytes()


def local_view(image: Path, base: Path, directory: Path, backing_fmt: str = "qcow2") -> bytes:
    """What QEMU reads through a copy of ``image`` whose backing file is the local ``base``."""
    copy = directory / f"local-{image.name}"
    shutil.copyfile(image, copy)
    qemu_img("rebase", "-u", "-b", base, "-F", backing_fmt, copy)
    return reference_raw(copy, directory / f"{copy.name}.ref").read_bytes()


async def read_all(node: BlockNode) -> bytes:
    return b"".join([bytes(await node.pread(o, min(MiB, node.size - o)))
                     for o in range(0, node.size, MiB)])


async def check_reads(image: Path, expected: bytes, remote: str,
                      options: OpenOptions | None = None) -> list[str]:
    """Open ``image``, compare every byte, and return the warnings, which name ``remote``."""
    node = await open_image(str(image), options)
    async with node:
        assert await read_all(node) == expected
        warnings = list(node.warnings)
    assert f"{image}: backing file {remote} is remote: reads go over the network" in warnings
    return warnings


# -- plain URLs ------------------------------------------------------------------------------------


async def test_https_backing_file(nginx: Nginx, base: Path, tmp_path: Path) -> None:
    url = nginx.url("refs/base.qcow2", tls=True)
    top = overlay(tmp_path, url, "qcow2")
    await check_reads(top, local_view(top, base, tmp_path), url,
                      OpenOptions(ca_file=str(nginx.ca_file)))
    # Without the CA the server's certificate does not verify: refused, naming the chain.
    with pytest.raises(VdiskError, match=r"field backing_file: backing file 'https://.*"
                                         r"certificate verif"):
        await open_image(str(top))


async def test_http_backing_file_read_as_qemu_reads_it(nginx: Nginx, base: Path,
                                                       tmp_path: Path) -> None:
    url = nginx.url("refs/base.qcow2")
    top = overlay(tmp_path, url, "qcow2")
    await check_reads(top, qemu_view(top, tmp_path), url)


async def test_nbd_backing_files(nbd_base: NbdServer, unix_base: NbdServer,
                                 tmp_path: Path) -> None:
    for server in (nbd_base, unix_base):
        top = overlay(tmp_path, server.url, "raw", name=f"top-{len(server.url)}.qcow2")
        await check_reads(top, qemu_view(top, tmp_path), server.url)


async def test_qed_backing_file_over_nbd(nbd_base: NbdServer, tmp_path: Path) -> None:
    top = overlay(tmp_path, nbd_base.url, "raw", name="top.qed", fmt="qed")
    await check_reads(top, qemu_view(top, tmp_path), nbd_base.url)


async def test_vmdk_parent_over_http(nginx: Nginx, tmp_path: Path) -> None:
    """A VMDK delta whose parentFileNameHint is a URL (QEMU's vmdk reads the parent's CID
    through its curl driver when it creates the delta)."""
    parent = nginx.root / "refs" / "parent.vmdk"
    parent.parent.mkdir(exist_ok=True)
    create(parent, SIZE, fmt="vmdk")
    qemu_io(parent, "write -P 0x55 0 1M", fmt="vmdk")
    url = nginx.url("refs/parent.vmdk")
    top = tmp_path / "delta.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", url, "-F", "vmdk", top, SIZE)
    qemu_io(top, "write -P 0x66 512k 64k", fmt="vmdk")
    await check_reads(top, qemu_view(top, tmp_path), url)


async def test_vmdk_extent_on_a_server(nginx: Nginx, tmp_path: Path) -> None:
    """A local VMDK descriptor whose flat extent is a URL: read from the server, named in the
    warnings, refused by --no-follow-outside."""
    data = bytes(range(256)) * (MiB // 256)
    (nginx.root / "refs").mkdir(exist_ok=True)
    (nginx.root / "refs" / "extent.raw").write_bytes(data)
    url = nginx.url("refs/extent.raw")
    descriptor = write_descriptor(tmp_path / "disk.vmdk", create_type="monolithicFlat",
                                  extents=[f'RDONLY 2048 FLAT "{url}" 0'])
    node = await open_image(str(descriptor))
    async with node:
        assert await read_all(node) == data
        assert (f"{descriptor}: extent file {url} is remote: reads go over the network"
                in node.warnings)
    with pytest.raises(ChainError, match=r"network URL.*refused by --no-follow-outside") as info:
        await open_image(str(descriptor), OpenOptions(follow_outside=False))
    assert info.value.field == "extent 1 (line 8)"


# -- json: references ------------------------------------------------------------------------------


def _json(options: dict[str, object]) -> str:
    return "json:" + json.dumps(options)


async def test_json_references(nginx: Nginx, base: Path, nbd_base: NbdServer,
                               unix_base: NbdServer, tmp_path: Path) -> None:
    port = nbd_base.url.split(":")[2].split("/")[0]
    sock = unix_base.url.partition("socket=")[2]
    http = nginx.url("refs/base.qcow2")
    cases = [
        # The nested form, read by QEMU itself over its curl driver.
        (_json({"driver": "qcow2", "file": {"driver": "http", "url": http}}), http, None),
        # The flattened form of the issue, over nbd.
        (_json({"file.driver": "nbd", "file.server.type": "inet",
                "file.server.host": "127.0.0.1", "file.server.port": port,
                "file.export": "disk"}), f"nbd://127.0.0.1:{port}/disk", None),
        # Legacy host/port, and a Unix socket, with the format stated at the top.
        (_json({"driver": "raw", "file": {"driver": "nbd", "host": "127.0.0.1",
                                          "port": port, "export": "disk"}}),
         f"nbd://127.0.0.1:{port}/disk", None),
        (_json({"driver": "raw", "file": {"driver": "nbd", "export": "disk",
                                          "server": {"type": "unix", "path": sock}}}),
         f"nbd+unix:///disk?socket={sock}", None),
        # HTTPS with the test's CA: QEMU cannot be given it, so the local base is the reference.
        (_json({"driver": "qcow2", "file": {"driver": "https", "sslverify": True,
                                            "url": nginx.url("refs/base.qcow2", tls=True)}}),
         nginx.url("refs/base.qcow2", tls=True), base),
    ]
    for index, (reference, remote, local) in enumerate(cases):
        directory = tmp_path / str(index)
        directory.mkdir()
        top = overlay(directory, reference, "raw" if "qcow2" not in reference else "qcow2")
        expected = (qemu_view(top, directory) if local is None
                    else local_view(top, local, directory))
        await check_reads(top, expected, remote, OpenOptions(ca_file=str(nginx.ca_file)))


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"driver": "qcow2", "file": {"driver": "https", "url": "https://127.0.0.1:1/b.qcow2",
                                  "sslverify": False}},
     UnsupportedError, "'file.sslverify' is off: an image may not switch off TLS verification"),
    ({"driver": "qcow2", "file": {"driver": "http", "url": "http://127.0.0.1:1/b",
                                  "cookie": "session=1"}},
     UnsupportedError, "'file.cookie' is not supported"),
    ({"file": {"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1",
                                           "port": "x"}}},
     FormatError, "'file.server.port' must be a port number"),
])
async def test_json_refused_before_any_connection(tmp_path: Path, options: dict[str, object],
                                                  error: type[VdiskError], match: str) -> None:
    top = overlay(tmp_path, _json(options), "raw")
    with pytest.raises(error, match=match) as info:
        await open_image(str(top))
    assert info.value.path == str(top) and info.value.field == "backing_file"


def test_bad_json_through_info_is_a_clear_error(tmp_path: Path) -> None:
    # (Every malformed form is in tests/block/test_jsonref.py; here the CLI's side of two.)
    for index, reference in enumerate(["json:" + "[" * 500,
                                       'json:{"file": {"driver": "https", "url": 7}}']):
        top = overlay(tmp_path, reference, "raw", name=f"bad{index}.qcow2")
        proc = subprocess.run([sys.executable, "-m", "vdiskfs", "info", str(top)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert f"{top}: field backing_file: json: reference:" in proc.stderr


# -- policy ----------------------------------------------------------------------------------------


async def test_no_follow_outside_refuses_remote_backing_files(nginx: Nginx, nbd_base: NbdServer,
                                                              tmp_path: Path) -> None:
    url = nginx.url("refs/base.qcow2", tls=True)
    cases = [
        (url, url),
        (_json({"driver": "qcow2", "file": {"driver": "https", "url": url}}), "json:"),
        (nbd_base.url, nbd_base.url),
    ]
    for index, (reference, shown) in enumerate(cases):
        top = overlay(tmp_path, reference, "qcow2", name=f"top{index}.qcow2")
        with pytest.raises(ChainError, match=r"network URL.*refused by --no-follow-outside") \
                as info:
            await open_image(str(top), OpenOptions(follow_outside=False))
        assert info.value.errno == errno.EPERM
        assert info.value.path == str(top) and info.value.field == "backing_file"
        assert shown in str(info.value)
        if index:
            continue  # one vdiskfs process shows the CLI's side
        proc = subprocess.run([sys.executable, "-m", "vdiskfs", "info", "--no-follow-outside",
                               str(top)], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "refused by --no-follow-outside" in proc.stderr


async def test_image_opened_by_url_never_opens_a_local_file(nginx: Nginx,
                                                            tmp_path: Path) -> None:
    """An image on a server naming an absolute path -- plainly, with ``file:``, or in a
    ``json:`` reference -- names a file on that server, never one on this machine."""
    local = tmp_path / "local.raw"
    local.write_bytes(b"\x77" * MiB)
    served = nginx.root / "refs" / "abs"
    served.mkdir(exist_ok=True)
    references = [str(local), f"file:{local}",
                  _json({"driver": "raw", "file": {"driver": "file", "filename": str(local)}})]
    for index, reference in enumerate(references):
        overlay(served, reference, "raw", name=f"top{index}.qcow2")
        with pytest.raises(VdiskError, match=r"not found \(looked for http://127\.0\.0\.1:"
                                             rf"\d+{local}\)"):
            await open_image(nginx.url(f"refs/abs/top{index}.qcow2"))


# -- credentials -----------------------------------------------------------------------------------


async def test_credentials_in_a_backing_url_show_nowhere(nginx: Nginx, tmp_path: Path) -> None:
    url = nginx.url("private/refs/base.qcow2", credentials=f"{USER}:{PASSWORD}@")
    shown = nginx.url("private/refs/base.qcow2", credentials=f"{USER}:***@")
    tops = [overlay(tmp_path, url, "qcow2"),
            overlay(tmp_path, _json({"driver": "qcow2", "file": {"driver": "http", "url": url}}),
                    "qcow2", name="json.qcow2")]
    expected = qemu_view(tops[0], tmp_path)
    # Text for one, JSON for the other: one vdiskfs process each.
    for top, args in zip(tops, (["info"], ["info", "--json"]), strict=True):
        await check_reads(top, expected, shown)
        proc = subprocess.run([sys.executable, "-m", "vdiskfs", *args, str(top)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert PASSWORD not in proc.stdout + proc.stderr
        assert f"{USER}:***@" in proc.stdout
        assert "is remote: reads go over the network" in proc.stdout
    # A failure names the chain, still without the password.
    (nginx.root / "private" / "refs" / "gone.qcow2").unlink(missing_ok=True)
    gone = overlay(tmp_path, url.replace("base", "gone"), "qcow2", name="gone.qcow2")
    with pytest.raises(VdiskError, match="backing file") as info:
        await open_image(str(gone))
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in nginx.log_text()


@pytest.mark.parametrize("reference", ["ssh://h/x.qcow2", "nbd:127.0.0.1:10809",
                                       "https:base.qcow2", "gluster://h/v/x"])
async def test_protocols_we_lack_are_refused_by_name(tmp_path: Path, reference: str) -> None:
    top = overlay(tmp_path, reference, "raw")
    with pytest.raises(UnsupportedError, match="this protocol reference is not supported") \
            as info:
        await open_image(str(top))
    assert info.value.path == str(top) and info.value.field == "backing_file"


async def test_an_image_may_not_switch_off_nbd_tls_verification(tmp_path: Path) -> None:
    top = overlay(tmp_path, "nbds://127.0.0.1:1/x?tls-verify-peer=0", "raw")
    with pytest.raises(UnsupportedError, match="may not switch off TLS verification") as info:
        await open_image(str(top))
    assert info.value.field == "backing_file"
