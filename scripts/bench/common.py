"""Shared pieces of the benchmarks: build images once, mount vdiskfs and its peer, run fio.

Every benchmark measures vdiskfs and its peer (qemu-storage-daemon's FUSE export of the same
image) in the same run on the same machine and prints the ratio; absolute numbers on a shared
2-core machine move from run to run, ratios much less. Besides the fio numbers, a mounted
daemon can be probed just before unmounting (`probe`): its peak RSS and, for vdiskfs, every
node's statistics read through the mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vdiskfs.fs.daemon import image_stem

REPO = Path(__file__).resolve().parents[2]
VDISKFS = [str(REPO / ".venv/bin/python"), "-m", "vdiskfs"]
CACHE = Path(os.environ.get("VDISKFS_BENCH_CACHE", Path.home() / ".cache/vdiskfs/bench"))
GiB = 1 << 30
MiB = 1 << 20
CLUSTER = 64 * 1024  # every benchmark qcow2's cluster size


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


def build_random_qcow2(name: str, size: int) -> Path:
    """CACHE/`name`.qcow2: `size` bytes, 64 KiB clusters, fully allocated with pseudo-random
    data (built once; under a temporary name, so an interrupted build is redone)."""
    image = CACHE / f"{name}.qcow2"
    if not image.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        raw = random_file(CACHE / f"{name}.tmp", size)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
            f"cluster_size={CLUSTER}", raw, image.with_suffix(".part"))
        raw.unlink()
        image.with_suffix(".part").rename(image)
    return image


def build_single() -> Path:
    """single.qcow2: 2 GiB, 64 KiB clusters, fully allocated with pseudo-random data."""
    return build_random_qcow2("single", 2 * GiB)


def build_chain_base() -> Path:
    """chain-base.qcow2: a copy of single.qcow2 that the backing chains are built over."""
    base = CACHE / "chain-base.qcow2"
    if not base.exists():
        run("cp", "--reflink=auto", build_single(), base.with_suffix(".part"))
        base.with_suffix(".part").rename(base)
    return base


def build_overlay(image: Path, backing: Path, first: int, step: int, pattern: int) -> Path:
    """A new qcow2 over `backing` that rewrites every `step`th cluster from cluster `first`.

    Built under a temporary name and renamed at the end, so an interrupted build is redone.
    The rewritten clusters hold the byte `pattern`; the others read through to `backing`.
    """
    part = image.with_suffix(".part")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
        "-b", backing.name, "-F", "qcow2", part)
    size = json.loads(run("qemu-img", "info", "--output=json", backing).stdout)["virtual-size"]
    commands = "".join(
        f"write -q -P {pattern} {offset} {CLUSTER}\n"
        for offset in range(first * CLUSTER, size, step * CLUSTER)
    )
    run("qemu-io", "-f", "qcow2", part, input=commands)
    part.rename(image)
    return image


def new_qcow2(image: Path, size: str, preallocation: str = "off") -> Path:
    """A new qcow2 with the benchmarks' cluster size, for one write run of one peer."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"cluster_size={CLUSTER},preallocation={preallocation}", image, size)
    return image


def check_image(image: Path) -> dict[str, Any]:
    """`qemu-img check`; any error, corruption or leak ends the benchmark with its report.

    Returns the check's JSON (allocated, compressed and fragmented cluster counts...).
    """
    result = subprocess.run(["qemu-img", "check", "--output=json", str(image)], text=True,
                            capture_output=True)
    if result.returncode != 0:
        sys.exit(f"qemu-img check {image} failed (exit {result.returncode}):\n"
                 f"{result.stdout}{result.stderr}")
    return json.loads(result.stdout)


def warm_page_cache(*files: Path) -> float:
    """Read `files` into the host page cache; returns the fraction that `fincore` finds there."""
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass
    rows = run("fincore", "--bytes", "--noheadings", "--raw", "--output=RES,SIZE",
               *files).stdout.split()
    resident, size = sum(map(int, rows[0::2])), sum(map(int, rows[1::2]))
    return resident / size if size else 1.0


@dataclass
class Mounted:
    """A raw view of an image served by some FUSE daemon."""

    name: str
    path: Path
    pid: int


@contextlib.contextmanager
def vdiskfs_mount(image: Path | str, extra: tuple[str, ...] = ()) -> Iterator[Mounted]:
    """`vdiskfs mount` of a file or a URL; the mounted file is named as the daemon names it."""
    mnt = Path(tempfile.mkdtemp(prefix="vdiskfs-bench-"))
    run(*VDISKFS, "mount", "--no-partitions", *extra, image, mnt)
    try:
        source = next(
            line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(mnt)
        )
        yield Mounted("vdiskfs", mnt / f"{image_stem(str(image))}.raw",
                      int(source.split(":")[1]))
    finally:
        subprocess.run([*VDISKFS, "unmount", str(mnt)], capture_output=True)
        os.rmdir(mnt)


def qsd_rbd(name: str) -> str:
    """QSD's `--blockdev` options of its `rbd` driver (qemu-block-extra) for vdiskfs's (and
    QEMU's) `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=F][:id=U]` name."""
    from vdiskfs.drivers.protocol.rbd.spec import parse_spec

    spec = parse_spec(name)
    fields = {"pool": spec.pool, "namespace": spec.namespace or None, "image": spec.image,
              "snapshot": spec.snapshot, "conf": spec.conf, "user": spec.user}
    if spec.keyring is not None or spec.options:
        raise ValueError(f"qsd_rbd: put keyring= and other options of {name} in the conf file")
    return ",".join(["driver=rbd"] + [f"{k}={v}" for k, v in fields.items() if v is not None])


def qsd_protocol(source: Path | str) -> str:
    """QSD's `--blockdev` options (without node-name and read-only) of the protocol node that
    reads `source`: a local file, an http(s) URL (the curl driver, from qemu-block-extra, with
    its defaults) or `nbd://host:port/export`."""
    text = str(source)
    if text.startswith("rbd:"):
        return qsd_rbd(text)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme in ("http", "https"):
        return f"driver={parts.scheme},url={text}"
    if parts.scheme == "nbd":
        return (f"driver=nbd,server.type=inet,server.host={parts.hostname},"
                f"server.port={parts.port or 10809},export={parts.path.lstrip('/')}")
    if parts.scheme:
        raise ValueError(f"qsd_mount: no QSD protocol node for {text}")
    return f"driver=file,filename={text}"


@contextlib.contextmanager
def qsd_mount(image: Path | str, fmt: str = "qcow2", writable: bool = False
              ) -> Iterator[Mounted]:
    """qemu-storage-daemon --export type=fuse of a file or URL (`qsd_protocol`): the peer (its
    mount point is a regular file)."""
    directory = Path(tempfile.mkdtemp(prefix="qsd-bench-"))
    target = directory / "disk.raw"
    target.touch()
    ro = "off" if writable else "on"
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"{qsd_protocol(image)},node-name=proto,read-only={ro}",
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

    def rate(self, unit: str) -> float:
        """MB/s when `unit` is "MB/s", else IOPS."""
        return self.mb_s if unit == "MB/s" else self.iops

    @property
    def cpu_per_request(self) -> float:
        """Daemon CPU seconds per fio request."""
        return self.cpu / max(self.ios, 1)


class FioHung(Exception):
    """A fio job made no progress within its limit: its FUSE connection was aborted."""


def fio(target: Mounted, *, rw: str, bs: str, iodepth: int = 1, size: str | None = None,
        runtime: int = 10, direct: bool = True, hot: bool = False,
        extra: tuple[str, ...] = (), limit: float | None = None) -> FioResult:
    """One fio job on a mounted raw file; the page cache is dropped first unless `hot`.

    With `limit` (seconds), a job still running then is ended by aborting the mount's FUSE
    connection and raises `FioHung`: a daemon that lost a request leaves fio in an
    uninterruptible wait that no signal to fio ends.

    With `hot`, whatever the caller put into the page cache stays there (see
    `warm_page_cache`); pair it with `direct` so that each request still reaches the daemon.
    """
    if not hot:
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
    abort = fuse_connection(target) / "abort"
    hung = threading.Event()

    def give_up() -> None:
        hung.set()
        abort.write_text("1\n")

    watchdog = threading.Timer(limit, give_up) if limit is not None else None
    if watchdog is not None:
        watchdog.start()
    try:
        out = json.loads(run(*args).stdout)
    except subprocess.CalledProcessError:
        if hung.is_set():
            raise FioHung(f"{target.name}: fio made no progress in {limit:g} s") from None
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
    cpu = cpu_seconds(target.pid) - before
    job = out["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    if side["io_bytes"] == 0 and "rw" in rw:
        side = job["read"]
    seconds = side["runtime"] / 1000.0
    return FioResult(side["io_bytes"], side["total_ios"], seconds, cpu)


@dataclass
class Probe:
    """A daemon looked at just before unmounting."""

    peak_rss: int  # VmHWM, bytes: the most memory the daemon has held since it started
    nodes: list[dict[str, object]]  # vdiskfs: every node's stats JSON, top first; QSD: none
    #: The kernel's limit on the FUSE connection's background requests (async direct I/O from
    #: libaio is sent as such): how many of a deep queue can reach the daemon at once.
    max_background: int | None


def peak_rss(pid: int) -> int:
    """VmHWM of a process in bytes (its peak resident set size)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def fuse_connection(target: Mounted) -> Path:
    """The fusectl directory of the mount's FUSE connection."""
    return Path("/sys/fs/fuse/connections") / str(os.minor(os.stat(target.path).st_dev))


def fuse_max_background(target: Mounted) -> int | None:
    """max_background of the mount's FUSE connection (fusectl), None if it cannot be read."""
    try:
        return int((fuse_connection(target) / "max_background").read_text())
    except (OSError, ValueError):
        return None


def vdiskfs_stats(target: Mounted) -> list[dict[str, object]]:
    """Every node's statistics for the image of a vdiskfs mount, in the `tree` file's order."""
    directory = target.path.parent / "stats" / target.path.stem
    names = [line.split()[0] for line in (directory / "tree").read_text().splitlines()]
    return [json.loads((directory / name).read_text()) for name in names]


def probe(target: Mounted) -> Probe:
    """Peak RSS, FUSE max_background and (vdiskfs) node statistics; call it inside the
    mount's `with`, after the job."""
    nodes = vdiskfs_stats(target) if target.name == "vdiskfs" else []
    return Probe(peak_rss(target.pid), nodes, fuse_max_background(target))


def median_result(results: list[FioResult]) -> FioResult:
    """The run with the median rate: a shared machine's host cache makes single runs swing."""
    ordered = sorted(results, key=lambda r: r.bytes / r.seconds)
    return ordered[len(ordered) // 2]


def report(title: str, ours: FioResult, peer: FioResult, unit: str) -> str:
    a, b = ours.rate(unit), peer.rate(unit)
    ratio = a / b if b else float("inf")  # a peer whose every run hung (remote.py)
    gib_ours = ours.bytes / GiB or 1
    gib_peer = peer.bytes / GiB or 1
    line = (
        f"{title:<34} vdiskfs {a:9.1f} {unit:<5} qsd {b:9.1f} {unit:<5} ratio {ratio:5.2f}x"
        f" | cpu/GiB {ours.cpu / gib_ours:6.2f}s vs {peer.cpu / gib_peer:6.2f}s"
        f" | cpu/req {ours.cpu_per_request * 1e6:6.1f}us"
        f" vs {peer.cpu_per_request * 1e6:6.1f}us"
    )
    print(line, flush=True)
    return line


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (drop_caches, FUSE mounts)")
