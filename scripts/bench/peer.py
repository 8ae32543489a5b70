#!/usr/bin/env python3
"""Peer benchmark (issue 9): vdiskfs vs qemu-storage-daemon 7.2's FUSE export, row by row.

The peer is QSD 7.2 (Debian's qemu-system-common): `--export type=fuse` of the same image file,
read-only for reads and `writable=on` for writes, default cache options (buffered host I/O, as
vdiskfs does). Both daemons serve the same files in the same run.

Images (built once, cached under ~/.cache/vdiskfs/bench; the first build takes minutes):
  single      single.qcow2: 2 GiB, 64 KiB clusters, fully allocated with pseudo-random data
  chain       chain2-top.qcow2 -> chain-base.qcow2 (a copy of single.qcow2): the top rewrote
              every 4th cluster, so it holds 25 % of them and reads hit both layers
  compressed  compressed.qcow2: 2 GiB, zlib, every cluster half random and half text, so that
              each one compresses about 2:1 (`qemu-img check` counts the compressed clusters)
Rows (fio; `--only` terms in brackets):
  [read-seq]       sequential 1 MiB reads of the whole disk, buffered (as `cat` reads)
  [read-qd1]       random 4 KiB reads, queue depth 1 (psync, O_DIRECT)
  [read-qd16]      random 4 KiB reads, queue depth 16 (libaio, O_DIRECT)
  [read-qd16-hot]  the same with the image files in the host page cache (read before the job,
                   caches not dropped); O_DIRECT on the FUSE file still sends every request to
                   the daemon, so this measures the daemon without the disk
  [read-qd64]      random 4 KiB reads, queue depth 64
  [write-seq]      sequential 1 MiB writes of the whole disk into a fresh 2 GiB qcow2
  [write-qd1|qd16|qd64]  random 4 KiB writes into a 2 GiB qcow2 with every cluster allocated
                   (preallocation=falloc, as in single.qcow2: writes overwrite in place)
Reads run on every image, writes on a single qcow2 only, each write run into a new image per
peer, with --end_fsync=1; vdiskfs's image must pass `qemu-img check` afterwards. The page
cache is dropped before every job but the hot one. Each row alternates vdiskfs and QSD
--repeat times and prints the median run of each: the rate, the ratio vdiskfs/QSD, each
daemon's CPU per GiB and per request, each daemon's peak RSS (VmHWM, read just before
unmounting) and its FUSE connection's max_background (how many async requests of a deep
queue the kernel lets through; QSD keeps the kernel default, 12), and, from vdiskfs's stats
files, the top image's `file` node `max_in_flight` and any in-flight byte cap and high-water
mark the daemon reports ("n/a" when it reports none). A markdown table of the ratios and
vdiskfs's CPU per request ends the output, ready for the README; a full run takes about an
hour on the 2-core machine, --quick about a quarter of that.

Usage: .venv/bin/python scripts/bench/peer.py [--repeat N] [--runtime S] [--quick]
           [--only TERMS] [--json FILE] [--vdiskfs-mount-opts="OPTS"]
  --only single,read-qd64 runs every single-image row and the qd64 reads of every image: a
  filter is terms joined by '-' that must all match (image, read/write, seq/qd1/qd16/qd64,
  hot/cold), filters joined by ',' (or repeated) are alternatives.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CACHE,
    CLUSTER,
    REPO,
    FioResult,
    GiB,
    MiB,
    Mounted,
    Probe,
    build_chain_base,
    build_overlay,
    build_single,
    check_image,
    fio,
    median_result,
    new_qcow2,
    probe,
    qsd_mount,
    report,
    require_root,
    run,
    vdiskfs_mount,
    warm_page_cache,
)

SIZE = 2 * GiB
#: The --only term of each image and its column in the summary table.
IMAGES = {"single": "single qcow2", "chain": "2-layer chain", "compressed": "zlib-compressed"}
#: Keys of vdiskfs's stats JSON that name an in-flight byte cap or count (the bounded-memory
#: engine adds them; until then the output says "n/a").
CAP_KEY = re.compile(r"in_?flight_bytes|bytes_cap|(^|_)cap(_|$)")


# --- images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    name: str  # a key of IMAGES
    path: Path  # the top image: what both peers mount
    files: tuple[Path, ...]  # every file of the chain, for warming the page cache
    info: str  # one line printed before the rows


def build_chain2() -> Path:
    """chain2-top.qcow2 over chain-base.qcow2; the top rewrote every 4th cluster (1, 5, 9...)."""
    top = CACHE / "chain2-top.qcow2"
    if not top.exists():
        build_overlay(top, build_chain_base(), first=1, step=4, pattern=0x5A)
    return top


def compressible_file(path: Path, size: int, seed: int = 2) -> Path:
    """Every 64 KiB cluster: 32 KiB of pseudo-random bytes, then 32 KiB of repeated text.

    Random data alone does not compress, and QEMU stores a cluster that does not shrink
    uncompressed; zeros could be skipped as holes. Half and half makes zlib's ratio about 2:1.
    """
    rng = random.Random(seed)
    half = CLUSTER // 2
    text = (b"vdiskfs peer benchmark: compressible half of a cluster. " * (half // 50 + 1))[:half]
    chunk = 64 * MiB
    with open(path, "wb") as f:
        for _ in range(0, size, chunk):
            noise = rng.randbytes(chunk // 2)
            buf = bytearray(chunk)
            for i in range(chunk // CLUSTER):
                buf[i * CLUSTER:i * CLUSTER + half] = noise[i * half:(i + 1) * half]
                buf[i * CLUSTER + half:(i + 1) * CLUSTER] = text
            f.write(buf)
    return path


def build_compressed() -> Path:
    image = CACHE / "compressed.qcow2"
    if not image.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        raw = compressible_file(CACHE / "compressed.tmp", SIZE)
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
            f"compression_type=zlib,cluster_size={CLUSTER}", raw, image.with_suffix(".part"))
        raw.unlink()
        image.with_suffix(".part").rename(image)
    return image


def open_images(names: list[str]) -> list[Image]:
    """Build (once) and describe the images named; fails if compressed.qcow2 did not compress."""
    images = []
    for name in names:
        if name == "single":
            path = build_single()
            images.append(Image(name, path, (path,),
                                f"{path.name}: {path.stat().st_size / GiB:.2f} GiB file"))
        elif name == "chain":
            top, base = build_chain2(), build_chain_base()
            top_clusters = check_image(top)["allocated-clusters"]
            images.append(Image(
                name, top, (top, base),
                f"{top.name} -> {base.name}: top holds {top_clusters} of {SIZE // CLUSTER}"
                f" clusters ({top_clusters / (SIZE // CLUSTER):.0%})"))
        else:
            path = build_compressed()
            # QEMU 7.2's `qemu-img map` has no per-extent `compressed` flag; check counts them.
            check = check_image(path)
            fraction = check["compressed-clusters"] / max(check["allocated-clusters"], 1)
            if fraction < 0.9:
                sys.exit(f"{path}: only {fraction:.0%} of the clusters are compressed;"
                         " delete it to rebuild")
            images.append(Image(
                name, path, (path,),
                f"{path.name}: {check['compressed-clusters']} of {check['allocated-clusters']}"
                f" clusters compressed ({fraction:.1%}), file {path.stat().st_size / GiB:.2f}"
                f" GiB for {SIZE / GiB:.0f} GiB ({SIZE / path.stat().st_size:.2f}:1)"))
    return images


# --- rows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str  # "read-qd16-hot": the --only terms and the JSON key
    title: str  # as in issue 9's table
    unit: str
    job: dict[str, object]  # common.fio's keyword arguments
    images: tuple[str, ...]
    #: Writes only: the preallocation of the new qcow2 each run writes into.
    preallocation: str | None = None

    @property
    def terms(self) -> set[str]:
        return set(self.key.split("-")) | ({"cold"} if not self.job.get("hot") else set())


def rows(runtime: int) -> list[Row]:
    every = tuple(IMAGES)
    rand = dict(rw="randread", bs="4k", runtime=runtime)
    end_fsync = ("--end_fsync=1",)
    randw = dict(rw="randwrite", bs="4k", runtime=runtime, extra=end_fsync)
    return [
        Row("read-seq", "read seq 1 MiB", "MB/s",
            dict(rw="read", bs="1M", size="2G", direct=False), every),
        Row("read-qd1", "read 4 KiB qd1", "IOPS", rand, every),
        Row("read-qd16", "read 4 KiB qd16", "IOPS", {**rand, "iodepth": 16}, every),
        Row("read-qd16-hot", "read 4 KiB qd16, hot page cache", "IOPS",
            {**rand, "iodepth": 16, "hot": True}, every),
        Row("read-qd64", "read 4 KiB qd64", "IOPS", {**rand, "iodepth": 64}, every),
        Row("write-seq", "write seq 1 MiB (fresh qcow2)", "MB/s",
            dict(rw="write", bs="1M", size="2G", extra=end_fsync), ("single",), "off"),
        Row("write-qd1", "write 4 KiB qd1", "IOPS", randw, ("single",), "falloc"),
        Row("write-qd16", "write 4 KiB qd16", "IOPS", {**randw, "iodepth": 16}, ("single",),
            "falloc"),
        Row("write-qd64", "write 4 KiB qd64", "IOPS", {**randw, "iodepth": 64}, ("single",),
            "falloc"),
    ]


def select(all_rows: list[Row], filters: list[str]) -> list[tuple[Row, str]]:
    """(row, image) pairs that match any filter; a filter's '-'-joined terms must all match."""
    images = {image for row in all_rows for image in row.images}
    vocabulary = images | {t for row in all_rows for t in row.terms} | {"cold", "hot"}
    wanted = [set(f.split("-")) for f in filters]
    for terms in wanted:
        if unknown := terms - vocabulary:
            sys.exit(f"--only: unknown term(s) {sorted(unknown)}; known: {sorted(vocabulary)}")
    return [
        (row, image) for row in all_rows for image in row.images
        if not wanted or any(terms <= row.terms | {image} for terms in wanted)
    ]


# --- runs --------------------------------------------------------------------------------


@dataclass
class Run:
    result: FioResult
    probe: Probe

    def file_node(self) -> dict[str, object] | None:
        """The top image's `file` node (its protocol child), from vdiskfs's stats."""
        if not self.probe.nodes:
            return None
        top = self.probe.nodes[0]["node"]
        return next((n for n in self.probe.nodes
                     if n.get("parent") == top and n.get("role") == "file"), None)

    def caps(self) -> dict[str, object]:
        """Cap keys of every node, as "<node>.<key>"."""
        return {f"{n['node']}.{k}": v for n in self.probe.nodes for k, v in n.items()
                if CAP_KEY.search(k)}

    def as_dict(self, unit: str) -> dict[str, object]:
        node = self.file_node()
        return {
            **asdict(self.result), "rate": self.result.rate(unit),
            "cpu_per_request_us": self.result.cpu_per_request * 1e6,
            "peak_rss": self.probe.peak_rss, "fuse_max_background": self.probe.max_background,
            "file_max_in_flight": node.get("max_in_flight") if node else None,
            "caps": self.caps(),
        }


def merge_caps(per_node: Iterable[dict[str, object]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for caps in per_node:
        for name, value in caps.items():
            key = name.rpartition(".")[2]  # "<node>.<key>" or already "<key>"
            if isinstance(value, int):
                out[key] = max(out.get(key, value), value)
    return out


def show_caps(caps: dict[str, int]) -> str:
    def size(key: str, value: int) -> str:
        if "bytes" not in key:
            return str(value)
        return f"{value / MiB:.3g} MiB" if value >= MiB else f"{value / 1024:.0f} KiB"

    return ", ".join(f"{k} {size(k, v)}" for k, v in caps.items()) or "n/a"


@contextlib.contextmanager
def mount(peer: str, image: Path | str, writable: bool,
          opts: tuple[str, ...]) -> Iterator[Mounted]:
    if peer == "vdiskfs":
        with vdiskfs_mount(image, (("--rw",) if writable else ()) + opts) as m:
            yield m
    else:
        with qsd_mount(image, writable=writable) as m:
            yield m


def one_run(peer: str, row: Row, image: Image, opts: tuple[str, ...], scratch: Path) -> Run:
    if row.preallocation is None:
        with mount(peer, image.path, False, opts) as m:
            if row.job.get("hot"):
                resident = warm_page_cache(*image.files)
                if resident < 0.95:
                    print(f"  warning: only {resident:.0%} of {image.name} in the page cache",
                          flush=True)
            result = fio(m, **row.job)  # type: ignore[arg-type]
            return Run(result, probe(m))
    target = new_qcow2(scratch / f"{peer}.qcow2", str(SIZE), row.preallocation)
    try:
        with mount(peer, target, True, opts) as m:
            result = fio(m, **row.job)  # type: ignore[arg-type]
            looked = probe(m)
        if peer == "vdiskfs":
            check_image(target)
        return Run(result, looked)
    finally:
        target.unlink(missing_ok=True)


@dataclass
class Measured:
    row: Row
    image: str
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"vdiskfs": [], "qsd": []})

    def median(self, peer: str) -> FioResult:
        return median_result([r.result for r in self.runs[peer]])

    @property
    def ratio(self) -> float:
        unit = self.row.unit
        theirs = self.median("qsd").rate(unit)
        return self.median("vdiskfs").rate(unit) / theirs if theirs else float("inf")

    def peak_rss(self, peer: str) -> int:
        return max(r.probe.peak_rss for r in self.runs[peer])

    def max_background(self, peer: str) -> str:
        return str(self.runs[peer][-1].probe.max_background or "?")

    def max_in_flight(self) -> int | None:
        values = [n["max_in_flight"] for r in self.runs["vdiskfs"]
                  if (n := r.file_node()) and "max_in_flight" in n]
        return max(values) if values else None  # type: ignore[type-var]

    def caps(self) -> dict[str, int]:
        """Each cap key's largest value over vdiskfs's runs and nodes (the JSON has them all)."""
        return merge_caps(r.caps() for r in self.runs["vdiskfs"])

    def as_dict(self) -> dict[str, object]:
        unit = self.row.unit
        return {
            "row": self.row.key, "title": self.row.title, "image": self.image, "unit": unit,
            "ratio": self.ratio,
            **{peer: {"median": {"rate": self.median(peer).rate(unit),
                                 "cpu_per_request_us": self.median(peer).cpu_per_request * 1e6},
                      "peak_rss": self.peak_rss(peer),
                      "runs": [r.as_dict(unit) for r in self.runs[peer]]}
               for peer in self.runs},
            "vdiskfs_file_max_in_flight": self.max_in_flight(),
            "vdiskfs_caps": self.caps(),
        }


def measure(row: Row, image: str, repeat: int, one: Callable[[str], Run]) -> Measured:
    """`repeat` runs of `one(peer)` per peer, alternating; prints the medians and probes."""
    measured = Measured(row, image)
    for _ in range(repeat):  # alternate the peers so that drifts hit both alike
        for peer in ("vdiskfs", "qsd"):
            measured.runs[peer].append(one(peer))
    report(f"{image} {row.key}", measured.median("vdiskfs"), measured.median("qsd"),
           row.unit)
    print(f"{'':<34} peak RSS vdiskfs {measured.peak_rss('vdiskfs') / MiB:6.1f} MiB"
          f" qsd {measured.peak_rss('qsd') / MiB:6.1f} MiB"
          f" | fuse max_background {measured.max_background('vdiskfs')}"
          f" vs {measured.max_background('qsd')}"
          f" | file max_in_flight {measured.max_in_flight() or 'n/a'}"
          f" | in-flight {show_caps(measured.caps())}",
          flush=True)
    return measured


# --- output ------------------------------------------------------------------------------


def summary(measured: list[Measured], all_rows: list[Row]) -> str:
    """Issue 9's table with vdiskfs/QSD ratios, and vdiskfs's CPU per request per image."""
    by = {(m.row.key, m.image): m for m in measured}
    lines = [
        "| workload | " + " | ".join(IMAGES.values()) + " | vdiskfs CPU/request (us) |",
        "| --- | " + " | ".join("---:" for _ in IMAGES) + " | ---: |",
    ]
    for row in all_rows:
        done = [by.get((row.key, image)) for image in IMAGES]
        if not any(done):
            continue
        cells = [f"{m.ratio:.2f}x" if m else ("-" if image in row.images else "")
                 for image, m in zip(IMAGES, done, strict=True)]
        cpu = " / ".join(f"{m.median('vdiskfs').cpu_per_request * 1e6:.0f}" if m else "-"
                         for image, m in zip(IMAGES, done, strict=True) if image in row.images)
        lines.append(f"| {row.title} | " + " | ".join(cells) + f" | {cpu} |")
    ours = max(m.peak_rss("vdiskfs") for m in measured)
    theirs = max(m.peak_rss("qsd") for m in measured)
    caps = merge_caps(m.caps() for m in measured)
    lines += [
        "",
        "Ratios are vdiskfs/QSD (higher is better for vdiskfs); CPU per request is listed per"
        " image (single / chain / compressed).",
        f"Peak RSS over all runs: vdiskfs {ours / MiB:.1f} MiB, QSD {theirs / MiB:.1f} MiB;"
        f" vdiskfs in-flight bytes: {show_caps(caps)}.",
    ]
    return "\n".join(lines)


def environment() -> dict[str, str]:
    def first_line(*args: str) -> str:
        try:
            return run(*args).stdout.splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError) as exc:  # only a record
            return f"unknown ({exc})"

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "vdiskfs": first_line("git", "-C", str(REPO), "describe", "--always", "--dirty"),
        "qsd": first_line("qemu-storage-daemon", "--version"),
        "fio": first_line("fio", "--version"),
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
    }


@dataclass
class Options:
    """The command line shared by the peer benchmarks (this one and remote.py)."""

    repeat: int
    runtime: int
    only: list[str]  # filters, each of '-'-joined terms (see select)
    json: Path | None
    mount_opts: tuple[str, ...]  # extra `vdiskfs mount` options


def parse_options(doc: str, only_example: str) -> Options:
    """Parse the command line of a benchmark whose usage is `doc` (its module docstring)."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(doc.splitlines()[1:]))
    parser.add_argument("--repeat", type=int,
                        help="runs per row and peer, alternating; the median is printed (3)")
    parser.add_argument("--runtime", type=int, help="seconds per random job (10)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --repeat 1 --runtime 3 unless given")
    parser.add_argument("--only", action="append", default=[], metavar="TERMS",
                        help=f"rows to run, e.g. {only_example}")
    parser.add_argument("--json", type=Path, metavar="FILE", help="save every number here")
    parser.add_argument("--vdiskfs-mount-opts", default="", metavar="OPTS",
                        help='extra `vdiskfs mount` options, e.g. --vdiskfs-mount-opts="--debug"')
    args = parser.parse_args()
    return Options(
        repeat=args.repeat or (1 if args.quick else 3),
        runtime=args.runtime or (3 if args.quick else 10),
        only=[f for only in args.only for f in only.split(",") if f],
        json=args.json,
        mount_opts=tuple(shlex.split(args.vdiskfs_mount_opts)),
    )


def main() -> None:
    require_root()
    options = parse_options(__doc__, "single, read-qd64, chain-hot")
    repeat, runtime, opts = options.repeat, options.runtime, options.mount_opts
    all_rows = rows(runtime)
    selected = select(all_rows, options.only)
    if not selected:
        sys.exit("--only selects no row")

    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    print(f"repeat {repeat}, runtime {runtime} s, vdiskfs mount options {list(opts)};"
          f" images in {CACHE}")
    images = {i.name: i for i in open_images([n for n in IMAGES
                                                if any(n == img for _, img in selected)])}
    for image in images.values():
        print(f"  {image.name:<11} {image.info}")
    measured = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="peer-", dir=CACHE) as tmp:
        for row, name in selected:
            one = functools.partial(one_run, row=row, image=images[name], opts=opts,
                                    scratch=Path(tmp))
            measured.append(measure(row, name, repeat, one))
    table = summary(measured, all_rows)
    print(f"\n{table}\n\n{len(measured)} rows in {(time.monotonic() - started) / 60:.1f} min")
    if options.json:
        options.json.write_text(json.dumps({
            "environment": env, "repeat": repeat, "runtime": runtime,
            "vdiskfs_mount_opts": list(opts),
            "images": {i.name: {"path": str(i.path), "info": i.info} for i in images.values()},
            "rows": [m.as_dict() for m in measured],
            "summary": table,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
