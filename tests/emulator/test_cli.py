"""``vdiskfs boot`` options and its one-line errors (no guest is started)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.cli import add_boot_arguments, parse_disk, parse_memory
from emulator.vmm import DiskConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "size"), [("256M", 256 << 20), ("1G", 1 << 30),
                                             ("64", 64 << 20), ("131072K", 128 << 20),
                                             ("512MiB", 512 << 20)])
def test_parse_memory(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1T", "16M", "-5M"])
def test_parse_memory_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory(text)


def test_parse_disk() -> None:
    assert parse_disk("a.qcow2") == DiskConfig("a.qcow2")
    assert parse_disk("a.img,format=raw,readonly=on") == DiskConfig("a.img", "raw", True)
    assert parse_disk("b.raw,overlay=new.qcow2").overlay == "new.qcow2"
    assert parse_disk("odd,,name.img,readonly=off") == DiskConfig("odd,name.img")


@pytest.mark.parametrize("text", ["", ",format=raw", "a.img,cache=none", "a.img,readonly=yes",
                                  "a.img,format"])
def test_parse_disk_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_disk(text)


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_boot_arguments(parser)
    args = parser.parse_args(["--kernel", "k", "--disk", "a.img", "--disk", "b.img,readonly=on",
                              "--memory", "128M", "--append", "root=/dev/vda1"])
    assert [d.path for d in args.disk] == ["a.img", "b.img"]
    assert args.memory == 128 << 20 and args.serial == "stdio"
    assert args.virtio_notify == "ioeventfd" and args.virtio_irq == "irqfd"


def _boot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", *args], cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdiskfs boot: error: "), proc.stderr
    return lines[0]


def test_bad_overlays_are_refused_clearly(tmp_path: Path) -> None:
    disk = tmp_path / "base.raw"
    disk.write_bytes(bytes(1 << 20))
    existing = tmp_path / "o.qcow2"
    existing.write_bytes(b"precious")
    line = _one_line_error(_boot("--kernel", "nonexistent",
                                 "--disk", f"{disk},format=raw,overlay={existing}"))
    # An existing file is continued only if it is a qcow2 overlay of the disk; this one is
    # not, and is left as it was.
    assert str(existing) in line and "qcow2" in line
    assert existing.read_bytes() == b"precious"
    line = _one_line_error(_boot("--kernel", "nonexistent", "--disk",
                                 f"{disk},readonly=on,overlay={tmp_path / 'new.qcow2'}"))
    assert "readonly=on and overlay=" in line


def test_missing_image_and_kernel(tmp_path: Path) -> None:
    line = _one_line_error(_boot("--kernel", "k", "--disk", str(tmp_path / "nope.qcow2")))
    assert "nope.qcow2" in line
    line = _one_line_error(_boot("--kernel", str(tmp_path / "no-kernel")))
    assert "no-kernel" in line or "/dev/kvm" in line
