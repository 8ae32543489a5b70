from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.images import info
from tests.support.mount import vdiskfs
from vdiskfs.errors import VdiskError
from vdiskfs.units import parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("512", 512), ("4k", 4096), ("10M", 10 << 20), ("1.5G", 3 << 29), ("2T", 2 << 40),
    ("64KiB", 65536),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.3", "-1", "10Q"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(VdiskError, match="invalid size"):
        parse_size(text)


def test_create_raw(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    vdiskfs("create", "-f", "raw", image, "3M")
    assert image.stat().st_size == 3 << 20 and image.stat().st_blocks == 0
    assert info(image)["format"] == "raw"
    proc = vdiskfs("create", "-f", "raw", image, "3M", check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr


def test_usage_errors(tmp_path: Path) -> None:
    assert vdiskfs("mount", tmp_path, check=False).returncode == 1
    proc = vdiskfs("create", "-f", "raw", "-o", "cluster_size=4k", tmp_path / "x", "1M",
                   check=False)
    assert proc.returncode == 1 and "invalid raw option" in proc.stderr
    assert vdiskfs("frobnicate", check=False).returncode == 2
