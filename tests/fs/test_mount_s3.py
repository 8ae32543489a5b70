"""``vdiskfs mount s3://...``: a partitioned qcow2 in a radosgw bucket mounted by the real
command, the disk and its partitions read as ``qemu-img convert`` of the local file; the keys
show in no stats file, log, ``info`` output or process title."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.images import qemu_img
from tests.support.mount import mounted, vdiskfs
from tests.support.partitioned import make_gpt_disk, reference_partitions
from tests.support.s3 import S3Store
from vdiskfs.fs.mount import find_mount

pytestmark = [pytest.mark.mount, pytest.mark.ceph]


def test_mount_s3_url_with_partitions(s3_store: S3Store, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_store.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    disk = make_gpt_disk(tmp_path)
    qemu_img("convert", "-O", "qcow2", disk.path, tmp_path / "gpt.qcow2")
    url = s3_store.put("mount/vm-disk.qcow2", tmp_path / "gpt.qcow2")
    data = disk.path.read_bytes()
    secret, access = s3_store.secret_key, s3_store.access_key

    info = vdiskfs("info", url)
    assert "file format: qcow2" in info.stdout and url in info.stdout
    assert secret not in info.stdout + info.stderr and access not in info.stdout + info.stderr

    log = tmp_path / "daemon.log"
    with mounted(url, mountpoint=tmp_path / "mnt",
                 options=("--debug", "--log-file", str(log))) as mnt:
        names = sorted(os.listdir(mnt))
        assert "vm-disk.raw" in names and "stats" in names
        assert (mnt / "vm-disk.raw").read_bytes() == data
        for part in reference_partitions(disk.path):
            exported = mnt / f"vm-disk-part{part.number}.raw"
            assert exported.read_bytes() == data[part.start:part.start + part.size]
        tree = (mnt / "stats" / "vm-disk" / "tree").read_text()
        assert "cache" in tree and "s3" in tree and url in tree
        s3_stats = next(p for p in (mnt / "stats" / "vm-disk").iterdir()
                        if p.name.endswith("-s3"))
        assert json.loads(s3_stats.read_text())["bytes_fetched"] > 0
        for path in (mnt / "stats").rglob("*"):
            if path.is_file():
                text = path.read_text()
                assert secret not in text and access not in text, path
        mount = find_mount(str(mnt))
        assert mount is not None and mount.daemon_pid is not None
        title = Path(f"/proc/{mount.daemon_pid}/cmdline").read_bytes()
        assert secret.encode() not in title and access.encode() not in title
    text = log.read_text()
    assert "mounted" in text
    assert secret not in text and access not in text


@pytest.mark.slow  # two daemons started: about 7 s
def test_mount_s3_errors(s3_store: S3Store, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing object and wrong keys: the mount fails with S3's reason, nothing mounted."""
    for name, value in s3_store.env(AWS_SECRET_ACCESS_KEY="wrong-secret-key").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3_store.put("mount/small.raw", os.urandom(1 << 20))
    (tmp_path / "mnt").mkdir()
    proc = vdiskfs("mount", s3_store.url("mount/small.raw"), tmp_path / "mnt", check=False)
    assert proc.returncode != 0
    assert "s3://vdiskfs/mount/small.raw: the secret key does not match the access key" \
        in proc.stderr and "SignatureDoesNotMatch" in proc.stderr
    assert "wrong-secret-key" not in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_store.secret_key)
    proc = vdiskfs("mount", s3_store.url("mount/none.raw"), tmp_path / "mnt", check=False)
    assert proc.returncode != 0
    assert "no object 'mount/none.raw' in bucket 'vdiskfs' [S3 error NoSuchKey, HTTP 404]" \
        in proc.stderr
    assert find_mount(str(tmp_path / "mnt")) is None
