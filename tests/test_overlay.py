"""``open_overlay``: a new qcow2 over an image of any format, which never changes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.images import create, info, qemu_img, qemu_io, reference_raw, sha256_file
from vdiskfs.block.context import OpenOptions
from vdiskfs.errors import VdiskError
from vdiskfs.overlay import open_overlay

MiB = 1 << 20
BASES = [
    ("raw", {}), ("qcow2", {}), ("vmdk", {"subformat": "monolithicSparse"}),
    ("vmdk", {"subformat": "streamOptimized"}), ("vhdx", {}), ("vdi", {}),
    ("vpc", {"subformat": "dynamic"}), ("qed", {}),
]


def _base(directory: Path, fmt: str, options: dict[str, str]) -> Path:
    source = create(directory / "source.qcow2", "6M")
    qemu_io(source, "write -P 0x31 0 2M", "write -P 0x32 3M 1M")
    base = directory / f"base.{fmt}"
    opts = ["-o", ",".join(f"{k}={v}" for k, v in options.items())] if options else []
    qemu_img("convert", "-O", fmt, *opts, source, base)
    return base


@pytest.mark.parametrize(("fmt", "options"), BASES, ids=[f"{f}-{o.get('subformat', '')}"
                                                         for f, o in BASES])
async def test_overlay_over_every_format(fmt: str, options: dict[str, str],
                                         tmp_path: Path) -> None:
    base = _base(tmp_path, fmt, options)
    digest = sha256_file(base)
    model = bytearray(reference_raw(base, tmp_path / "before.raw", fmt=fmt).read_bytes())
    overlay = tmp_path / "top.qcow2"
    rng = random.Random(7)
    node = await open_overlay(str(base), str(overlay), OpenOptions(format=fmt))
    try:
        assert node.size == len(model)
        assert node.child("backing") is not None and node.child("backing").driver == fmt
        for _ in range(40):
            offset = rng.randrange(0, len(model))
            data = rng.randbytes(min(rng.randrange(1, 200_000), len(model) - offset))
            await node.pwrite(offset, data)
            model[offset : offset + len(data)] = data
        assert bytes(await node.pread(0, node.size)) == bytes(model)
    finally:
        await node.aclose()
    assert sha256_file(base) == digest
    details = info(overlay)
    assert details["backing-filename"] == base.name
    assert details["backing-filename-format"] == fmt
    qemu_img("check", overlay)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    qemu_img("compare", "-F", "raw", overlay, expected)


async def test_existing_overlay_is_continued_and_checked(tmp_path: Path) -> None:
    base = _base(tmp_path, "qcow2", {})
    overlay = tmp_path / "o.qcow2"
    node = await open_overlay(str(base), str(overlay), OpenOptions())
    await node.pwrite(0, b"first")
    await node.aclose()
    node = await open_overlay(str(base), str(overlay), OpenOptions())
    try:
        assert await node.pread(0, 5) == b"first"
    finally:
        await node.aclose()
    stranger = create(tmp_path / "stranger.qcow2", "6M")
    with pytest.raises(VdiskError, match="not an overlay of"):
        await open_overlay(str(stranger), str(overlay), OpenOptions())
    with pytest.raises(VdiskError):
        await open_overlay(str(tmp_path / "missing.qcow2"), str(tmp_path / "n.qcow2"),
                           OpenOptions())
    assert not (tmp_path / "n.qcow2").exists()
