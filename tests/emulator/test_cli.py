"""``vdiskfs boot`` options and its one-line errors (no guest is started)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.arch.x86_64 import layout
from emulator.cli import add_boot_arguments, parse_disk, parse_memory
from emulator.vmm import DiskConfig
from tests.support.images import create, qemu_img
from tests.support.nbd import qemu_nbd
from vdiskfs.urlargs import RemoteOptions

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


def test_parse_disk_snapshot_is_read_only() -> None:
    disk = parse_disk("a.qcow2,snapshot=before upgrade")
    assert disk == DiskConfig("a.qcow2", read_only=True, snapshot="before upgrade")
    assert parse_disk("a.qcow2,readonly=on,snapshot=1").snapshot == "1"


@pytest.mark.parametrize(("text", "message"), [
    ("a.qcow2,snapshot=", "needs a snapshot"),
    ("a.qcow2,snapshot=s1,readonly=off", "read-only"),
    ("a.qcow2,snapshot=s1,overlay=new.qcow2", "overlay cannot record"),
])
def test_parse_disk_refuses_snapshot(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_disk(text)


def test_unknown_snapshot_is_refused_clearly(tmp_path: Path) -> None:
    image = create(tmp_path / "snap.qcow2", "1M")
    qemu_img("snapshot", "-c", "first", image)
    line = _one_line_error(_boot("--kernel", "nonexistent", "--disk", f"{image},snapshot=nope"))
    assert str(image) in line and "'nope'" in line and "'first'" in line


@pytest.mark.parametrize("text", ["", ",format=raw", "a.img,cache=none", "a.img,readonly=yes",
                                  "a.img,format"])
def test_parse_disk_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_disk(text)


@pytest.mark.parametrize(("text", "disk"), [
    # http(s) is read-only unless an overlay takes the writes (QEMU's auto-read-only).
    ("https://h/d/disk.qcow2", DiskConfig("https://h/d/disk.qcow2", read_only=True)),
    ("https://u:p@h/x.raw,format=raw", DiskConfig("https://u:p@h/x.raw", "raw", True)),
    ("http://h/x.qcow2,readonly=on", DiskConfig("http://h/x.qcow2", read_only=True)),
    ("https://h/x.qcow2,overlay=new.qcow2",
     DiskConfig("https://h/x.qcow2", overlay="new.qcow2")),
    # A query's commas and "=" stay in the URL; only known trailing options are options.
    ("https://h/x.qcow2?sig=a,b&e=1,format=qcow2",
     DiskConfig("https://h/x.qcow2?sig=a,b&e=1", "qcow2", True)),
    ("https://h/x.qcow2?a=1,b=2", DiskConfig("https://h/x.qcow2?a=1,b=2", read_only=True)),
    ("https://h/x.qcow2?a=1,,format=x", DiskConfig("https://h/x.qcow2?a=1,format=x",
                                                   read_only=True)),
    # nbd is writable unless readonly=on.
    ("nbd://127.0.0.1:10809/export", DiskConfig("nbd://127.0.0.1:10809/export")),
    ("nbd+unix:///export?socket=/run/a,b.sock,readonly=on",
     DiskConfig("nbd+unix:///export?socket=/run/a,b.sock", read_only=True)),
    ("nbd+unix:///e?socket=/tmp/s&x-timeout=5,format=raw,overlay=/tmp/o.qcow2",
     DiskConfig("nbd+unix:///e?socket=/tmp/s&x-timeout=5", "raw", False, "/tmp/o.qcow2")),
    # A local path ends at its first comma, and "=" in it is no option.
    ("dir/a=b.img,readonly=on", DiskConfig("dir/a=b.img", read_only=True)),
])
def test_parse_disk_urls(text: str, disk: DiskConfig) -> None:
    assert parse_disk(text) == disk


def test_parse_disk_refuses_writes_over_http() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="readonly=off: http") as info:
        parse_disk("https://reader:s3cret@h/x.qcow2,readonly=off")
    assert "s3cret" not in str(info.value)
    with pytest.raises(argparse.ArgumentTypeError, match="--disk option 'cache=none'"):
        parse_disk("nbd.img,cache=none")


def test_parse_disk_throttle() -> None:
    disk = parse_disk("a.qcow2,throttle.iops-total=2000,readonly=on,throttle.bps-read=50M,"
                      "throttle.group=G")
    assert disk.read_only and disk.throttle is not None
    assert disk.throttle.group == "G"
    assert disk.throttle.limits is not None
    assert disk.throttle.limits.options() == "bps-read=52428800,iops-total=2000"
    joined = parse_disk("b.img,throttle.group=G").throttle
    assert joined is not None and joined.limits is None and joined.group == "G"
    assert parse_disk("c.img").throttle is None


@pytest.mark.parametrize(("text", "message"), [
    ("a.img,throttle.iops-total=-1", "--disk: field throttle.iops-total: '-1' is negative"),
    ("a.img,throttle.bps-total=1G,throttle.bps-read=1M",
     "field throttle.bps-total: bps/iops/max total values and read/write values cannot"),
    ("a.img,throttle.speed=9", "field throttle.speed: unknown throttle option"),
    ("a.img,throttle.iops-read", "field throttle.iops-read: needs a value"),
    ("a.img,throttle.iops-read=5,throttle.iops-read-max=1",
     "field throttle.iops-read-max: bps_max/iops_max cannot be lower than bps/iops"),
    ("a.img,throttle.iops-read=5,throttle.iops-read-max=10,throttle.iops-read-max-length=0",
     "field throttle.iops-read-max-length: '0' is zero"),
    ("a.img,throttle.bps-write=99999999999999999",
     "field throttle.bps-write: bps/iops/max values must be within [0, 1000000000000000]"),
])
def test_parse_disk_refuses_bad_throttle_options(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse_disk(text)
    assert message in str(info.value)


def test_disks_of_one_throttle_group_must_agree(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    line = _one_line_error(_boot(
        "--kernel", "nonexistent",
        "--disk", f"{disk},format=raw,readonly=on,throttle.iops-total=10,throttle.group=g",
        "--disk", f"{disk},format=raw,readonly=on,throttle.iops-total=20,throttle.group=g"))
    assert "throttle group 'g' has the limits 'iops-total=10'" in line


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_boot_arguments(parser)
    args = parser.parse_args(["--kernel", "k", "--disk", "a.img", "--disk", "b.img,readonly=on",
                              "--memory", "128M", "--append", "root=/dev/vda1"])
    assert [d.path for d in args.disk] == ["a.img", "b.img"]
    assert args.memory == 128 << 20 and args.serial == "stdio"
    assert args.virtio_notify == "ioeventfd" and args.virtio_irq == "irqfd"
    assert RemoteOptions.from_args(args) == RemoteOptions()
    args = parser.parse_args(["--kernel", "k", "--disk", "https://h/x.qcow2", "--ca-file", "ca",
                              "--no-verify-tls", "--no-cache", "--cache-dir", "d"])
    assert RemoteOptions.from_args(args) == RemoteOptions("ca", False, False, "d")


def _boot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", *args], cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


def _one_line_error(proc: subprocess.CompletedProcess[str], *, warnings: int = 0) -> str:
    """The error line; ``warnings``: the number of warning lines (each said once) before it."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    told, lines = lines[:warnings], lines[warnings:]
    assert len(set(told)) == warnings and not any(": error: " in line for line in told), told
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


def test_too_many_disks_are_refused_before_anything_opens(tmp_path: Path) -> None:
    disks = [f"--disk={tmp_path / f'missing{i}.raw'},format=raw"
             for i in range(len(layout.VIRTIO_IRQS) + 1)]
    line = _one_line_error(_boot("--kernel", "nonexistent", *disks))
    assert f"at most {len(layout.VIRTIO_IRQS)}" in line and "--disk" in line


def test_missing_image_and_kernel(tmp_path: Path) -> None:
    line = _one_line_error(_boot("--kernel", "k", "--disk", str(tmp_path / "nope.qcow2")))
    assert "nope.qcow2" in line
    line = _one_line_error(_boot("--kernel", str(tmp_path / "no-kernel")))
    assert "no-kernel" in line or "/dev/kvm" in line


def test_url_disks_are_refused_clearly_and_without_credentials(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"https://reader:s3cret@127.0.0.1:{port}/d/root.qcow2"
    line = _one_line_error(_boot("--kernel", "k", "--disk", url))
    assert "reader:***@127.0.0.1" in line and "s3cret" not in line
    line = _one_line_error(_boot("--kernel", "k", "--disk",
                                 f"{url},overlay={tmp_path / 'new.qcow2'}"))
    assert "over an http(s) image" in line and "s3cret" not in line
    assert not (tmp_path / "new.qcow2").exists()
    proc = _boot("--kernel", "k", "--disk", f"{url},readonly=off")
    assert proc.returncode == 2 and "readonly=off: http(s) images are read-only" in proc.stderr
    assert "s3cret" not in proc.stderr


@pytest.mark.parametrize("command", [["emulator"], ["vdiskfs", "boot"]])
def test_process_title_hides_credentials(command: list[str]) -> None:
    """While a disk URL is being opened (a server that accepts and never answers), the
    command line that ps shows has the password replaced."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://reader:s3cret@127.0.0.1:{silent.getsockname()[1]}/root.raw"
        proc = subprocess.Popen([sys.executable, "-m", *command, "--kernel", "k",
                                 "--disk", url], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline")
            deadline = time.monotonic() + 30
            while b"reader:***@" not in cmdline.read_bytes():
                assert proc.poll() is None, "the VMM ended before its title was seen"
                assert time.monotonic() < deadline, cmdline.read_bytes()
                time.sleep(0.05)
            assert b"s3cret" not in cmdline.read_bytes()
            assert b"--disk" in cmdline.read_bytes()
        finally:
            proc.kill()
            proc.wait()


def test_boot_help_shares_the_remote_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "vdiskfs", "boot", "--help"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    for option in ("--ca-file", "--no-verify-tls", "--no-cache", "--cache-dir"):
        assert option in proc.stdout


def test_nbd_disks_writable_unless_said_and_overlay_over_nbd(tmp_path: Path) -> None:
    """Before the kernel is loaded: a read-only export refuses the default (writable) disk
    with the way out; overlay= over an nbd URL is created with the URL as its backing file."""
    import json

    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    overlay = tmp_path / "new.qcow2"
    with qemu_nbd(base, "raw", export="base") as server:
        line = _one_line_error(_boot("--kernel", "nonexistent", "--disk", server.url))
        assert server.url in line and "readonly=on" in line
        proc = _boot("--kernel", str(tmp_path / "nonexistent"), "--disk",
                     f"{server.url},format=raw,overlay={overlay}")
        line = _one_line_error(proc, warnings=1)
        assert "nonexistent" in line
        # A local overlay pulling a remote backing file says so, once.
        assert f"backing file {server.url} is remote" in proc.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == server.url
    assert info["backing-filename-format"] == "raw"
