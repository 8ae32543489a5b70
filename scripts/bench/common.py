"""Shared pieces of the benchmarks: build images once, mount vdiskfs and its peer, run fio.

Every benchmark measures vdiskfs and its peer (qemu-storage-daemon's FUSE export of the same
image) in the same run on the same machine and prints the ratio; absolute numbers on a shared
2-core machine move from run to run, ratios much less.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VDISKFS = [str(REPO / ".venv/bin/python"), "-m", "vdiskfs"]
CACHE = Path(os.environ.get("VDISKFS_BENCH_CACHE", Path.home() / ".cache/vdiskfs/bench"))
GiB = 1 << 30
MiB = 1 << 20


def run(*args: str | os.PathLike[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=True, text=True, capture_output=True,
                          **kwargs)  # type: ignore[call-overload]


def drop_caches() -> None:
    """Cold page cache for both the FUSE file and the image file below it."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """Pseudo-random, incompressible content, written in 64 MiB chunks."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(0, size, 64 * MiB):
            f.write(rng.randbytes(min(64 * MiB, size - f.tell())))
    return path


@dataclass
class Mounted:
    """A raw view of an image served by some FUSE daemon."""

    name: str
    path: Path
    pid: int


@contextlib.contextmanager
def vdiskfs_mount(image: Path, extra: tuple[str, ...] = ()) -> Iterator[Mounted]:
    mnt = Path(tempfile.mkdtemp(prefix="vdiskfs-bench-"))
    run(*VDISKFS, "mount", "--no-partitions", *extra, image, mnt)
    try:
        source = next(
            line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(mnt)
        )
        yield Mounted("vdiskfs", mnt / f"{image.stem}.raw", int(source.split(":")[1]))
    finally:
        subprocess.run([*VDISKFS, "unmount", str(mnt)], capture_output=True)
        os.rmdir(mnt)


@contextlib.contextmanager
def qsd_mount(image: Path, fmt: str = "qcow2", writable: bool = False) -> Iterator[Mounted]:
    """qemu-storage-daemon --export type=fuse: the peer (its mount point is a regular file)."""
    directory = Path(tempfile.mkdtemp(prefix="qsd-bench-"))
    target = directory / "disk.raw"
    target.touch()
    ro = "off" if writable else "on"
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=proto,filename={image},read-only={ro}",
            "--blockdev", f"driver={fmt},node-name=fmt,file=proto,read-only={ro}",
            "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={target},"
                        f"writable={'on' if writable else 'off'}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(line.split()[1] == str(target)
                      for line in Path("/proc/mounts").read_text().splitlines()):
            if proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon failed: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not mount in 30 s")
            time.sleep(0.05)
        yield Mounted("qsd", target, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(target)], capture_output=True)
        target.unlink(missing_ok=True)
        os.rmdir(directory)


@dataclass
class FioResult:
    bytes: int
    ios: int
    seconds: float
    cpu: float  # daemon CPU seconds during the job

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def iops(self) -> float:
        return self.ios / self.seconds


def fio(target: Mounted, *, rw: str, bs: str, iodepth: int = 1, size: str | None = None,
        runtime: int = 10, direct: bool = True, extra: tuple[str, ...] = ()) -> FioResult:
    drop_caches()
    engine = "libaio" if iodepth > 1 else "psync"
    args = [
        "fio", "--name=bench", f"--filename={target.path}", f"--rw={rw}", f"--bs={bs}",
        f"--ioengine={engine}", f"--iodepth={iodepth}", f"--direct={int(direct)}",
        "--output-format=json", "--randseed=7", "--norandommap",
        *extra,
    ]
    args += [f"--size={size}"] if size else [f"--runtime={runtime}", "--time_based"]
    before = cpu_seconds(target.pid)
    out = json.loads(run(*args).stdout)
    cpu = cpu_seconds(target.pid) - before
    job = out["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    if side["io_bytes"] == 0 and "rw" in rw:
        side = job["read"]
    seconds = side["runtime"] / 1000.0
    return FioResult(side["io_bytes"], side["total_ios"], seconds, cpu)


def median_result(results: list[FioResult]) -> FioResult:
    """The run with the median rate: a shared machine's host cache makes single runs swing."""
    ordered = sorted(results, key=lambda r: r.bytes / r.seconds)
    return ordered[len(ordered) // 2]


def report(title: str, ours: FioResult, peer: FioResult, unit: str) -> str:
    if unit == "MB/s":
        a, b = ours.mb_s, peer.mb_s
    else:
        a, b = ours.iops, peer.iops
    gib_ours = ours.bytes / GiB or 1
    gib_peer = peer.bytes / GiB or 1
    line = (
        f"{title:<34} vdiskfs {a:9.1f} {unit:<5} qsd {b:9.1f} {unit:<5} ratio {a / b:5.2f}x"
        f" | cpu/GiB {ours.cpu / gib_ours:6.2f}s vs {peer.cpu / gib_peer:6.2f}s"
        f" | cpu/req {ours.cpu / max(ours.ios, 1) * 1e6:6.1f}us"
        f" vs {peer.cpu / max(peer.ios, 1) * 1e6:6.1f}us"
    )
    print(line, flush=True)
    return line


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (drop_caches, FUSE mounts)")
