"""``vdiskfs info`` against ``qemu-img info`` on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.images import create, info, qemu_img
from tests.support.mount import vdiskfs
from vdiskfs.info import size_to_str


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 B"), (512, "512 B"), (1000, "0.977 KiB"), (1024, "1 KiB"), (200704, "196 KiB"),
    (10485760, "10 MiB"), (1610612736, "1.5 GiB"), (10000000, "9.54 MiB"),
])
def test_size_to_str_matches_qemu(value: int, text: str) -> None:
    assert size_to_str(value) == text


def _chain(tmp_path: Path) -> Path:
    create(tmp_path / "base.vdi", "4M", fmt="vdi")
    create(tmp_path / "mid.qcow2", "4M", backing="base.vdi", backing_fmt="vdi",
           cluster_size=4096)
    top = create(tmp_path / "top.qcow2", "6M", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_img("snapshot", "-c", "first", top)
    return top


def test_json_agrees_with_qemu_img(tmp_path: Path) -> None:
    top = _chain(tmp_path)
    ours = json.loads(vdiskfs("info", "--json", top).stdout)
    theirs = info(top, "--backing-chain")
    current: dict | None = ours
    for reference in theirs:
        assert current is not None
        for key in ("format", "virtual-size", "cluster-size", "backing-filename",
                    "backing-filename-format", "dirty-flag"):
            assert current.get(key) == reference.get(key), key
        if reference["format"] == "qcow2":
            assert current["format-specific"] == reference["format-specific"]
        current = current.get("backing-image")
    assert current is None
    assert [s["name"] for s in ours["snapshots"]] == ["first"]


def test_text_shows_the_chain(tmp_path: Path) -> None:
    top = _chain(tmp_path)
    text = vdiskfs("info", top).stdout
    assert text.count("image: ") == 3
    assert "virtual size: 6 MiB (6291456 bytes)" in text
    assert "backing file: mid.qcow2" in text and "backing file format: vdi" in text
    assert "Snapshot list:" in text and "first" in text
    assert "Format specific information:\n    compat: 1.1" in text


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\x00\x00\x00\x07" + bytes(200))
    proc = vdiskfs("info", bad, check=False)
    assert proc.returncode == 1 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
