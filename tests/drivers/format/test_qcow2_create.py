"""Creating qcow2 images: every option as ``qemu-img info`` reports it, ``qemu-img check``
clean, the combinations QEMU refuses refused, and a workload into a created overlay."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import QEMU_IMG, qemu_io, reference_raw
from tests.support.workload import (
    apply_workload,
    assert_clean,
    assert_same_as_model,
    make_workload,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.drivers.format.qcow2.create import create_qcow2
from vdiskfs.errors import UnsupportedError, VdiskError

KiB = 1024
MiB = 1024 * KiB


def _in(directory: Path, *args: str) -> str:
    """A qemu-img command in ``directory`` (where QEMU 7.2 resolves data file names)."""
    proc = subprocess.run([QEMU_IMG, *args], cwd=directory, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _info(path: Path) -> dict[str, Any]:
    return json.loads(_in(path.parent, "info", "--output=json", path.name))


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("default", {}, {"compat": "1.1", "refcount-bits": 16, "lazy-refcounts": False,
                     "extended-l2": False, "compression-type": "zlib"}),
    ("v2", {"compat": "0.10"}, {"compat": "0.10", "refcount-bits": 16}),
    ("512", {"cluster_size": 512}, {}),
    ("4k-refcount-1", {"cluster_size": 4096, "refcount_bits": 1}, {"refcount-bits": 1}),
    ("512-refcount-64", {"cluster_size": 512, "refcount_bits": 64}, {"refcount-bits": 64}),
    ("2m-refcount-8", {"cluster_size": 2 * MiB, "refcount_bits": 8}, {"refcount-bits": 8}),
    ("extended-l2", {"extended_l2": True, "cluster_size": 32 * KiB}, {"extended-l2": True}),
    ("lazy", {"lazy_refcounts": True}, {"lazy-refcounts": True}),
    ("zstd", {"compression_type": "zstd"}, {"compression-type": "zstd"}),
    ("data-file", {"data_file": "disk.data"}, {"data-file": "disk.data",
                                               "data-file-raw": False}),
    ("data-file-raw", {"data_file": "disk.data", "data_file_raw": True},
     {"data-file": "disk.data", "data-file-raw": True}),
    ("metadata", {"preallocation": "metadata"}, {}),
    ("falloc", {"preallocation": "falloc", "cluster_size": 4096}, {}),
    ("full", {"preallocation": "full", "refcount_bits": 32}, {"refcount-bits": 32}),
    ("full-data-file", {"preallocation": "full", "data_file": "disk.data"}, {}),
]


@pytest.mark.parametrize(("name", "options", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_create_as_asked(name: str, options: dict[str, Any], expected: dict[str, Any],
                               tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    size = 3 * MiB + 512 * 3
    await create_qcow2(str(path), size, **options)
    info = _info(path)
    assert info["virtual-size"] == size
    assert info["cluster-size"] == options.get("cluster_size", 64 * KiB)
    assert info["dirty-flag"] is False
    specific = info["format-specific"]["data"]
    for key, value in expected.items():
        assert specific[key] == value, key
    assert_clean(path, "qcow2")
    if "data_file" in options:
        assert (tmp_path / "disk.data").stat().st_size == size
    if options.get("preallocation") in ("metadata", "falloc", "full") and "data_file" not in (
            options):
        mapped = json.loads(_in(tmp_path, "map", "--output=json", path.name))
        assert all(entry["data"] and entry["depth"] == 0 for entry in mapped)
    if options.get("preallocation") in ("falloc", "full"):
        allocated = (tmp_path / options.get("data_file", "disk.qcow2")).stat().st_blocks * 512
        assert allocated >= size
    # Our reader agrees with QEMU's, and writing works.
    node = await open_image(str(path), OpenOptions(read_only=False))
    try:
        assert await node.pread(0, node.size) == bytes(size)
        await node.pwrite(size - 5000, b"end" * 1000)
    finally:
        await node.aclose()
    assert_clean(path, "qcow2")


async def test_create_with_backing_file_records_its_format(tmp_path: Path) -> None:
    base = tmp_path / "images" / "base.qcow2"
    base.parent.mkdir()
    await create_qcow2(str(base), 2 * MiB)
    qemu_io(base, "write -q -P 0x42 0 2M")
    (tmp_path / "overlays").mkdir()
    top = tmp_path / "overlays" / "top.qcow2"
    await create_qcow2(str(top), 2 * MiB, backing_file="../images/base.qcow2")
    info = _info(top)
    assert info["backing-filename"] == "../images/base.qcow2"
    assert info["backing-filename-format"] == "qcow2"  # probed
    assert_clean(top, "qcow2")
    await create_qcow2(str(tmp_path / "v2.qcow2"), 2 * MiB, compat="0.10",
                       backing_file="images/base.qcow2", backing_format="qcow2")
    assert _info(tmp_path / "v2.qcow2")["backing-filename-format"] == "qcow2"
    # A workload into the overlay: QEMU sees the result through the chain.
    node = await open_image(str(top), OpenOptions(read_only=False))
    model = bytearray(b"\x42" * 2 * MiB)
    try:
        await apply_workload(node, make_workload(node.size, 41, count=80), model)
    finally:
        await node.aclose()
    assert_clean(top, "qcow2")
    assert_same_as_model(top, "qcow2", model, tmp_path / "model.raw")
    assert reference_raw(base, tmp_path / "base.raw").read_bytes() == b"\x42" * 2 * MiB


async def test_extended_l2_preallocation_keeps_the_backing_visible(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x17" * MiB)
    top = tmp_path / "top.qcow2"
    await create_qcow2(str(top), MiB, backing_file="base.raw", backing_format="raw",
                       extended_l2=True, preallocation="metadata")
    assert_clean(top, "qcow2")
    assert reference_raw(top, tmp_path / "top.raw").read_bytes() == b"\x17" * MiB


async def test_odd_size_is_rounded_to_sectors(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    await create_qcow2(str(path), 1_000_000)
    assert _info(path)["virtual-size"] == 1_000_448


async def test_large_sparse_image_has_room_for_its_l1(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    await create_qcow2(str(path), 1 << 40, cluster_size=4096, refcount_bits=64)
    assert _info(path)["virtual-size"] == 1 << 40
    assert_clean(path, "qcow2")
    assert path.stat().st_size < 8 * MiB


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"compat": "0.10", "refcount_bits": 8}, UnsupportedError, "refcount widths"),
    ({"compat": "0.10", "lazy_refcounts": True}, UnsupportedError, "lazy refcounts"),
    ({"compat": "0.10", "compression_type": "zstd"}, UnsupportedError, "compression"),
    ({"compat": "0.10", "data_file": "x"}, UnsupportedError, "external data file"),
    ({"extended_l2": True, "cluster_size": 8192}, UnsupportedError, "at least 16384"),
    ({"data_file_raw": True}, VdiskError, "needs a data_file"),
    ({"backing_file": "b.raw", "backing_format": "raw", "preallocation": "metadata"},
     UnsupportedError, "preallocation"),
    ({"backing_file": "b.raw", "backing_format": "raw", "data_file": "d",
      "data_file_raw": True}, UnsupportedError, "data_file_raw"),
    ({"cluster_size": 3000}, VdiskError, "power of two"),
    ({"refcount_bits": 128}, VdiskError, "power of two up to 64"),
    ({"compat": "2.0"}, VdiskError, "compat"),
    ({"preallocation": "sparse"}, VdiskError, "preallocation"),
])
async def test_refused_like_qemu(options: dict[str, Any], error: type[Exception], match: str,
                                 tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    with pytest.raises(error, match=match):
        await create_qcow2(str(path), MiB, **options)
    assert not path.exists()


async def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(VdiskError, match="File exists"):
        await create_qcow2(str(path), MiB)
    assert path.read_bytes() == b"precious"
    (tmp_path / "taken.data").write_bytes(b"also precious")
    with pytest.raises(VdiskError, match="File exists"):
        await create_qcow2(str(tmp_path / "new.qcow2"), MiB, data_file="taken.data")
    assert not (tmp_path / "new.qcow2").exists()
    assert os.path.getsize(tmp_path / "taken.data") == len(b"also precious")
