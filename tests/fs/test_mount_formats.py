"""Every image variant through a real FUSE mount: the whole raw file's sha256 equals QEMU's
``qemu-img convert -O raw``, and the per-layer statistics add up along a backing chain."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.support.images import create, qemu_io, sha256_file
from tests.support.mount import mounted
from tests.support.qcow2_images import RECIPES, Qcow2Images

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2-mount"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_qcow2_sha256_through_the_mount(qcow2_images: Qcow2Images, name: str,
                                        tmp_path: Path) -> None:
    image = qcow2_images.get(name)
    with mounted(image.path, mountpoint=tmp_path / "mnt",
                 options=("--no-partitions",)) as mnt:
        exported = mnt / f"{image.path.stem}.raw"
        assert exported.stat().st_size == len(image.reference)
        assert sha256_file(exported) == hashlib.sha256(image.reference).hexdigest()


@pytest.mark.parametrize(("fmt", "options"), [
    ("vmdk", {"subformat": "monolithicSparse"}),
    ("vmdk", {"subformat": "streamOptimized"}),
    ("vpc", {"subformat": "dynamic"}),
    ("vhdx", {}),
    ("vdi", {}),
    ("qed", {}),
])
def test_other_formats_through_the_mount(fmt: str, options: dict[str, str],
                                         tmp_path: Path) -> None:
    source = create(tmp_path / "source.qcow2", "8M")
    qemu_io(source, "write -P 0x5a 0 1M", "write -P 0xa5 3M 1536k", "write -z 5M 64k")
    image = tmp_path / f"disk.{fmt}"
    from tests.support.images import qemu_img, reference_raw

    qemu_img("convert", "-O", fmt, *(["-o", ",".join(f"{k}={v}" for k, v in options.items())]
                                     if options else []), source, image)
    reference = reference_raw(image, tmp_path / "ref.raw", fmt=fmt)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--no-partitions",)) as mnt:
        assert sha256_file(mnt / "disk.raw") == sha256_file(reference)
        assert json.loads((mnt / "stats" / "disk" / "0-" f"{fmt}").read_text())["driver"] == fmt


def test_stats_add_up_along_a_chain(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 1 0 4M")
    top = create(tmp_path / "top.qcow2", "4M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 2 0 1M")
    with mounted(top, mountpoint=tmp_path / "mnt", options=("--no-partitions",)) as mnt:
        stats = mnt / "stats" / "top"

        def read(name: str) -> dict[str, int]:
            return json.loads((stats / name).read_text())

        with open(mnt / "top.raw", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == b"\x02" * (1 << 20) + b"\x01" * (3 << 20)
        top_stats, top_file = read("0-qcow2"), read("1-file")
        base_stats, base_file = read("2-qcow2"), read("3-file")
        assert top_stats["rd_bytes"] >= 4 << 20
        # What the top delegated to its backing file is exactly what the backing file served.
        assert top_stats["backing_bytes"] == base_stats["rd_bytes"] >= 3 << 20
        assert top_stats["backing_reads"] == base_stats["rd_operations"]
        # Each format layer's own data came from its file, plus its metadata.
        own = top_stats["rd_bytes"] - top_stats["backing_bytes"] - top_stats["zero_bytes_read"]
        assert top_file["rd_bytes"] >= own
        assert base_file["rd_bytes"] >= base_stats["rd_bytes"] - base_stats["zero_bytes_read"]
        assert top_stats["l2_cache_misses"] >= 1 and top_stats["l2_cache_hits"] >= 1
