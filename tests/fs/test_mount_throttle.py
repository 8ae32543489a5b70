"""``vdiskfs mount --throttle``: a throttle node on top of every image, its counters in the stats
files, a group shared by two images, and the limits changed through ``stats/<stem>/throttle``.
No timing is asserted: the bucket arithmetic is checked on a fake clock in
tests/drivers/filter/test_throttle.py, the rates by scripts/bench/throttle.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.images import create, qemu_io, write_pattern_file
from tests.support.mount import mounted, vdiskfs
from vdiskfs.fs.mount import find_mount

pytestmark = pytest.mark.mount


def _direct_reads(path: Path, count: int, size: int = 65536) -> None:
    """``count`` reads that reach the daemon (O_DIRECT: no page cache, no readahead)."""
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={size}", f"count={count}",
                    "iflag=direct", "status=none"], check=True)


def _stats(mnt: Path, stem: str, node: str = "0-throttle") -> dict[str, object]:
    return json.loads((mnt / "stats" / stem / node).read_text())


def test_throttled_mount_counts_waits_and_takes_new_limits(tmp_path: Path) -> None:
    a = write_pattern_file(tmp_path / "a.img", seed=1, length=4 << 20)
    b = tmp_path / "b.qcow2"
    create(b, "4M")
    qemu_io(b, "write -P 0x11 0 1M")
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(b)], check=True)
    options = ("--throttle", "iops-read=50,group=shared", "--log-file", str(tmp_path / "log"))
    with mounted(a, b, mountpoint=tmp_path / "mnt", options=options) as mnt:
        for stem in ("a", "b"):
            assert (mnt / "stats" / stem / "throttle").read_text() == \
                "iops-read=50,group=shared\n"
            top = _stats(mnt, stem)
            assert top["driver"] == "throttle" and top["children"] == ["1-raw" if stem == "a"
                                                                       else "1-qcow2"]
        # A snapshot reads the image's files: the image's budget.
        assert _stats(mnt, "b@s1")["driver"] == "throttle"
        assert (mnt / "stats" / "b@s1" / "throttle").read_text() == \
            "iops-read=50,group=shared\n"
        # The bucket holds 5 requests (a tenth of a second); 12 must wait for the others.
        _direct_reads(mnt / "a.raw", 6)
        _direct_reads(mnt / "b.raw", 6)
        a_top, b_top = _stats(mnt, "a"), _stats(mnt, "b")
        assert a_top["throttled_reads"] + b_top["throttled_reads"] >= 12 - 5
        assert a_top["throttled_ns"] > 0 or b_top["throttled_ns"] > 0
        assert a_top["queued_reads"] == b_top["queued_reads"] == 0
        assert a_top["throttled_writes"] == 0
        # New limits through one member apply to the whole group.
        (mnt / "stats" / "a" / "throttle").write_text("bps-read=100M,iops-read=10000\n")
        assert (mnt / "stats" / "b" / "throttle").read_text() == \
            "bps-read=104857600,iops-read=10000,group=shared\n"
        before = _stats(mnt, "b")["throttled_reads"]
        _direct_reads(mnt / "b.raw", 16)
        assert _stats(mnt, "b")["throttled_reads"] == before
        # Bad input: EINVAL, the limits unchanged, the reason in the log.
        for bad in ("iops-read=-1", "speed=1", "iops-read=10,iops-read-max=5",
                    "group=other"):
            with pytest.raises(OSError) as exc:
                (mnt / "stats" / "a" / "throttle").write_text(bad)
            assert exc.value.errno == errno.EINVAL
        assert (mnt / "stats" / "a" / "throttle").read_text() == \
            "bps-read=104857600,iops-read=10000,group=shared\n"
        # Other stats files stay read-only; the image files too, though the mount is not "ro".
        with pytest.raises(OSError) as exc:
            (mnt / "stats" / "a" / "tree").write_text("x")
        assert exc.value.errno == errno.EACCES
        with pytest.raises(OSError) as exc:
            os.open(mnt / "a.raw", os.O_RDWR)
        assert exc.value.errno == errno.EROFS
    log = (tmp_path / "log").read_text()
    assert "iops-read-max: bps_max/iops_max cannot be lower than bps/iops" in log
    assert "unknown throttle option" in log


def test_partitions_sit_above_the_throttle(tmp_path: Path) -> None:
    disk = tmp_path / "p.img"
    disk.write_bytes(bytes(4 << 20))
    subprocess.run(["sfdisk", "-q", str(disk)], input="start=2048, size=2048\n", text=True,
                   check=True)
    with mounted(disk, mountpoint=tmp_path / "mnt",
                 options=("--format", "raw", "--throttle", "bps-total=1G")) as mnt:
        assert (mnt / "p-part1.raw").stat().st_size == 1 << 20
        _direct_reads(mnt / "p-part1.raw", 4)
        assert _stats(mnt, "p")["rd_operations"] >= 4  # the disk's throttle saw them


def test_bad_throttle_options_fail_before_mounting(tmp_path: Path) -> None:
    image = write_pattern_file(tmp_path / "d.img", seed=2, length=1 << 20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for option, message in (
        ("bps-read=-50M", "--throttle: field bps-read: '-50M' is negative"),
        ("bps-total=1,bps-write=2", "cannot be used at the same time"),
        (" ", "--throttle: give limits"),
        ("colour=red", "field colour: unknown throttle option"),
    ):
        proc = vdiskfs("mount", "--throttle", option, image, mnt, check=False)
        assert proc.returncode == 1, option
        assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert find_mount(str(mnt)) is None
