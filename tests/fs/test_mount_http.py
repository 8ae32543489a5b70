"""``vdiskfs mount URL``: an image on nginx over HTTPS, mounted by the real command, reads as
``qemu-img convert`` of the local file; a URL's credentials show nowhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.http_server import PASSWORD, USER, Nginx
from tests.support.images import create, qemu_io, reference_raw, sha256_file
from tests.support.mount import mounted, vdiskfs
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
        assert "1-http" in tree and url in tree

    # Without the CA, the mount is refused with the reason, and nothing is mounted.
    proc = vdiskfs("mount", url, tmp_path / "mnt", check=False)
    assert proc.returncode != 0
    assert "TLS certificate verification failed" in proc.stderr
    assert find_mount(str(tmp_path / "mnt")) is None


def test_mount_url_with_credentials(nginx: Nginx, tmp_path: Path) -> None:
    data = os.urandom(2 << 20)
    (nginx.root / "private" / "secret.raw").write_bytes(data)
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{nginx.http_port}/private/secret.raw"
    with mounted(url, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--no-partitions")) as mnt:
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
