"""``vdiskfs mount URL``: an image on nginx over HTTPS, mounted by the real command, reads as
``qemu-img convert`` of the local file; a URL's credentials show nowhere."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.support.http_server import PASSWORD, USER, Nginx
from tests.support.images import create, qemu_img, qemu_io, reference_raw, sha256_file
from tests.support.mount import mounted, vdiskfs
from tests.support.partitioned import make_gpt_disk, reference_partitions
from vdiskfs.fs.daemon import image_stem
from vdiskfs.fs.mount import find_mount

pytestmark = pytest.mark.mount


def test_image_stem_of_urls() -> None:
    assert image_stem("https://h/d/disk.qcow2?token=x") == "disk"
    assert image_stem("https://u:p@h:8443/a/b.c.raw") == "b.c"
    assert image_stem("https://h/a%2Fb.raw") == "a_b"
    assert image_stem("https://h/") == "h"


def test_mount_https_url(nginx: Nginx, tmp_path: Path) -> None:
    source = create(tmp_path / "src.qcow2", "8M")
    qemu_io(source, "write -P 0x5a 0 1M", "write -P 0xa5 3M 1536k", "write -z 5M 64k")
    served = nginx.root / "mnt" / "disk.qcow2"
    served.parent.mkdir(exist_ok=True)
    shutil.copyfile(source, served)
    reference = reference_raw(source, tmp_path / "ref.raw")
    url = f"https://127.0.0.1:{nginx.https_port}/mnt/disk.qcow2"
    with mounted(url, mountpoint=tmp_path / "mnt",
                 options=("--ca-file", str(nginx.ca_file), "--no-partitions")) as mnt:
        assert sorted(p.name for p in mnt.iterdir()) == ["disk.raw", "stats"]
        assert sha256_file(mnt / "disk.raw") == sha256_file(reference)
        tree = (mnt / "stats" / "disk" / "tree").read_text()
        assert "1-cache" in tree and "2-http" in tree and url in tree
        cache = json.loads((mnt / "stats" / "disk" / "1-cache").read_text())
        assert cache["bytes_fetched"] > 0 and cache["cached_bytes"] <= cache["bytes_fetched"]
    # --no-cache: the format node reads the server directly.
    with mounted(url, mountpoint=tmp_path / "mnt",
                 options=("--ca-file", str(nginx.ca_file), "--no-partitions",
                          "--no-cache")) as mnt:
        assert sha256_file(mnt / "disk.raw") == sha256_file(reference)
        tree = (mnt / "stats" / "disk" / "tree").read_text()
        assert "cache" not in tree and "1-http" in tree
    # --cache-dir: the second mount reads every block from the cache directory.
    for attempt in range(2):
        with mounted(url, mountpoint=tmp_path / "mnt",
                     options=("--ca-file", str(nginx.ca_file), "--no-partitions",
                              "--cache-dir", str(tmp_path / "cache"))) as mnt:
            assert sha256_file(mnt / "disk.raw") == sha256_file(reference)
            http = json.loads((mnt / "stats" / "disk" / "2-http").read_text())
            cache = json.loads((mnt / "stats" / "disk" / "1-cache").read_text())
            if attempt == 1:
                assert http["bytes_fetched"] == 0 and cache["disk_hits"] > 0

    # Without the CA, the mount is refused with the reason, and nothing is mounted.
    proc = vdiskfs("mount", url, tmp_path / "mnt", check=False)
    assert proc.returncode != 0
    assert "TLS certificate verification failed" in proc.stderr
    assert find_mount(str(tmp_path / "mnt")) is None


def test_mount_url_with_credentials(nginx: Nginx, tmp_path: Path) -> None:
    data = os.urandom(2 << 20)
    (nginx.root / "private" / "secret.raw").write_bytes(data)
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{nginx.http_port}/private/secret.raw"
    log = tmp_path / "daemon.log"
    with mounted(url, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--no-partitions", "--debug",
                          "--log-file", str(log))) as mnt:
        assert (mnt / "secret.raw").read_bytes() == data
        info = find_mount(str(mnt))
        assert info is not None and info.daemon_pid is not None
        cmdline = Path(f"/proc/{info.daemon_pid}/cmdline").read_bytes()
        assert PASSWORD.encode() not in cmdline
        environ = Path(f"/proc/{info.daemon_pid}/environ").read_bytes()
        assert PASSWORD.encode() not in environ
        for path in (mnt / "stats").rglob("*"):
            if path.is_file():
                assert PASSWORD not in path.read_text(), path
        assert f"{USER}:***@" in (mnt / "stats" / "secret" / "tree").read_text()
    assert "mounted 1 file(s)" in log.read_text()
    assert PASSWORD not in log.read_text()


def test_mount_url_partitions(nginx: Nginx, tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path)
    served = nginx.root / "parts" / "gpt.qcow2"
    served.parent.mkdir(exist_ok=True)
    qemu_img("convert", "-O", "qcow2", disk.path, served)
    data = disk.path.read_bytes()
    with mounted(nginx.url("parts/gpt.qcow2"), mountpoint=tmp_path / "mnt") as mnt:
        for part in reference_partitions(disk.path):
            exported = mnt / f"gpt-part{part.number}.raw"
            assert exported.read_bytes() == data[part.start:part.start + part.size]


def test_file_replaced_under_the_mount_gives_eio(nginx: Nginx, tmp_path: Path) -> None:
    path = nginx.root / "replaced.raw"
    path.write_bytes(os.urandom(4 << 20))
    with mounted(nginx.url("replaced.raw"), mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--no-partitions")) as mnt, \
            open(mnt / "replaced.raw", "rb") as f:
        os.pread(f.fileno(), 4096, 0)
        new = tmp_path / "new.raw"
        new.write_bytes(os.urandom(4 << 20))
        st = path.stat()
        os.utime(new, (st.st_atime + 10, st.st_mtime + 10))
        os.replace(new, path)
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), 4096, 3 << 20)
        assert info.value.errno == errno.EIO


def test_mount_local_overlay_over_a_url_backing_file(nginx: Nginx, tmp_path: Path) -> None:
    """A local qcow2 whose backing file is on the server, with credentials in its URL: the
    mount reads as QEMU reads the overlay over the local base, says on stderr that the backing
    file is remote, and shows the password in no stats file or log."""
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 0x71 0 2M")
    served = nginx.root / "private" / "mnt-base.qcow2"
    shutil.copyfile(base, served)
    top = create(tmp_path / "top.qcow2", "4M", backing=base, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x72 1M 64k")
    reference = reference_raw(top, tmp_path / "ref.raw")
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{nginx.http_port}/private/mnt-base.qcow2"
    qemu_img("rebase", "-q", "-u", "-b", url, "-F", "qcow2", top)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    proc = vdiskfs("mount", "--no-partitions", "--debug", "--log-file", log, top, mnt)
    try:
        shown = url.replace(PASSWORD, "***")
        assert f"backing file {shown} is remote: reads go over the network" in proc.stderr
        assert sha256_file(mnt / "top.raw") == sha256_file(reference)
        tree = (mnt / "stats" / "top" / "tree").read_text()
        assert "backing" in tree and f"4-http  (file) {shown}" in tree
        for path in (mnt / "stats").rglob("*"):
            if path.is_file():
                assert PASSWORD not in path.read_text(), path
        assert PASSWORD not in proc.stdout + proc.stderr
    finally:
        vdiskfs("unmount", mnt)
    assert "is remote" in log.read_text() and PASSWORD not in log.read_text()
