"""``vdiskfs mount nbd://...``: an NBD export (a qcow2 file served raw by qemu-nbd) mounted
through the real command line, read and written, and ``vdiskfs info`` of it."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from tests.support.images import create, qemu_img, qemu_io, run
from tests.support.mount import mounted, vdiskfs, write_synced
from tests.support.nbd import qemu_nbd
from vdiskfs.fs.daemon import image_stem

pytestmark = pytest.mark.mount


def test_image_stem_of_urls() -> None:
    assert image_stem("nbd://127.0.0.1:10809/vm/deb.qcow2") == "deb"
    assert image_stem("nbd+unix:///deb.qcow2?socket=/run/x.sock") == "deb"
    assert image_stem("nbd://host/disk") == "disk"
    assert image_stem("nbd://host/") == "host"  # the default export: the host
    assert image_stem("nbd+unix:///?socket=s") == "disk"
    assert image_stem("/vm/debian.qcow2") == "debian"


def test_mount_qcow2_over_nbd_read_and_write(tmp_path: Path) -> None:
    image = create(tmp_path / "deb.qcow2", "32M")
    qemu_io(image, "write -P 0x61 0 1M", "write -P 0x62 17M 64k", fmt="qcow2")
    run("truncate", "-s", "4M", image)  # room for clusters: qemu-nbd cannot grow the file
    reference = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, reference)
    with qemu_nbd(image, "raw", export="vm/deb.qcow2", writable=True) as server:
        info = vdiskfs("info", server.url).stdout
        assert "file format: qcow2" in info and "virtual size: 32 MiB" in info
        with mounted(server.url, mountpoint=tmp_path / "mnt", options=("--rw",)) as mnt:
            assert sorted(os.listdir(mnt)) == ["deb.raw", "stats"]
            assert (mnt / "deb.raw").read_bytes() == reference.read_bytes()
            tree = (mnt / "stats" / "deb" / "tree").read_text()
            assert "qcow2" in tree and "(file) nbd://127.0.0.1:" in tree
            write_synced(mnt / "deb.raw", b"\x77" * 8192, 5 << 20)
    qemu_io(reference, "write -P 0x77 5M 8k", fmt="raw")
    run("qemu-img", "check", image)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, reference)


def test_mounted_export_whose_server_dies(tmp_path: Path) -> None:
    """The server killed under a mount: reads of the file get EIO at once (no hang), and the
    mount still unmounts cleanly."""
    image = tmp_path / "d.raw"
    image.write_bytes(os.urandom(32 << 20))
    with qemu_nbd(image, "raw", export="d") as server, mounted(
            server.url, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        fd = os.open(mnt / "d.raw", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == image.read_bytes()[:4096]
            server.kill()
            start = time.monotonic()
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, 24 << 20)  # never read: not in the page cache
            assert exc.value.errno == errno.EIO
            assert time.monotonic() - start < 10
        finally:
            os.close(fd)


def test_create_over_an_nbd_base_and_mount_it(tmp_path: Path) -> None:
    """``vdiskfs create -b nbd://...``: the URL recorded as the backing file, the size and
    format taken from the export; the new image mounts and reads through to the server."""
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(4 << 20))
    with qemu_nbd(base, "raw", export="base") as server:
        overlay = tmp_path / "top.qcow2"
        vdiskfs("create", "-b", server.url, "-F", "raw", overlay)
        info = json.loads(qemu_img("info", "--output=json", "-U", overlay))
        assert info["backing-filename"] == server.url and info["virtual-size"] == 4 << 20
        with mounted(overlay, mountpoint=tmp_path / "mnt") as mnt:
            assert (mnt / "top.raw").read_bytes() == base.read_bytes()
