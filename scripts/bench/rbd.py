#!/usr/bin/env python3
"""RBD benchmark (issue 13): vdiskfs vs qemu-storage-daemon's rbd driver, same image, same run.

A throwaway Ceph cluster (tests/support/ceph.py: one monitor, one memstore OSD, on 127.0.0.1)
holds two images of --size bytes of pseudo-random data: `bench-raw`, the bytes as they are
(read `--format raw`), and `bench-qcow2`, a fully allocated qcow2 (64 KiB clusters) put with
`rbd import`, read by each side's qcow2 driver. vdiskfs mounts `rbd:rbd/IMAGE:conf=FILE`; the
peer is QSD 7.2 with `--blockdev driver=rbd,pool=rbd,image=IMAGE,conf=FILE` (qemu-block-extra)
under the format and a FUSE export, read-only. Both use librbd with its defaults.

Rows (fio; `--only` terms as in peer.py, joined by '-', alternatives by ','):
  [read-seq]   sequential 1 MiB reads of the whole image, buffered, page cache dropped first
  [read-qd1]   random 4 KiB reads, queue depth 1 (psync, O_DIRECT), --runtime seconds
  [read-qd16]  random 4 KiB reads, queue depth 16 (libaio, O_DIRECT)
Each row alternates vdiskfs and QSD --repeat times and prints the median of each, the ratio
vdiskfs/QSD (target >= 1.0x), CPU per GiB and per request; a markdown table of the ratios
ends the output. The cluster starts in about a second and is gone at the end.

Usage: .venv/bin/python scripts/bench/rbd.py [--repeat N] [--runtime S] [--quick]
           [--only TERMS] [--json FILE] [--vdiskfs-mount-opts="OPTS"]
(as peer.py; from a worktree whose code the venv does not have, with PYTHONPATH=$PWD)
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import (
    CLUSTER,
    MiB,
    fio,
    probe,
    qsd_mount,
    random_file,
    require_root,
    run,
    vdiskfs_mount,
)
from peer import Measured, Row, Run, environment, measure, parse_options, select

from tests.support.ceph import Cluster, start_cluster

# This file is rbd.py: librbd's binding, `import rbd`, must not find it (the script's own
# directory comes first on sys.path).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

#: Bytes of each image, in MiB: a seq run reads it all; memstore keeps about 2x in RAM.
SIZE_MIB = 512
#: The --only term of each image and its column in the summary table.
IMAGES = {"raw": "raw in RBD", "qcow2": "qcow2 in RBD"}


def rows(runtime: int, size_mib: int) -> list[Row]:
    rand = dict(rw="randread", bs="4k", runtime=runtime)
    every = tuple(IMAGES)
    return [
        Row("read-seq", "read seq 1 MiB", "MB/s",
            dict(rw="read", bs="1M", size=f"{size_mib}M", direct=False), every),
        Row("read-qd1", "read 4 KiB qd1", "IOPS", rand, every),
        Row("read-qd16", "read 4 KiB qd16", "IOPS", {**rand, "iodepth": 16}, every),
    ]


def put_images(cluster: Cluster, size_mib: int, scratch: Path) -> dict[str, str]:
    """The two images in the cluster; their `rbd:` names."""
    raw = random_file(scratch / "bench.raw", size_mib * MiB, seed=13)
    qcow2 = scratch / "bench.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}",
        raw, qcow2)
    names = {}
    for fmt, source in (("raw", raw), ("qcow2", qcow2)):
        cluster.rbd("import", source, f"rbd/bench-{fmt}")
        source.unlink()
        names[fmt] = cluster.qemu_name(f"rbd/bench-{fmt}")
    return names


def one_run(peer: str, row: Row, name: str, fmt: str, opts: tuple[str, ...]) -> Run:
    if peer == "vdiskfs":
        mounted = vdiskfs_mount(name, ("--format", fmt, *opts))
    else:
        mounted = qsd_mount(name, fmt=fmt)
    with mounted as m:
        result = fio(m, **row.job)  # type: ignore[arg-type]
        return Run(result, probe(m))


def summary(measured: list[Measured], all_rows: list[Row]) -> str:
    by = {(m.row.key, m.image): m for m in measured}
    lines = ["| workload | " + " | ".join(IMAGES.values()) + " | vdiskfs CPU/request (us) |",
             "| --- | " + " | ".join("---:" for _ in IMAGES) + " | ---: |"]
    for row in all_rows:
        done = [by.get((row.key, image)) for image in IMAGES]
        if not any(done):
            continue
        cells = [f"{m.ratio:.2f}x" if m else "-" for m in done]
        cpu = " / ".join(f"{m.median('vdiskfs').cpu_per_request * 1e6:.0f}" if m else "-"
                         for m in done)
        lines.append(f"| {row.title} | " + " | ".join(cells) + f" | {cpu} |")
    lines += ["", "Ratios are vdiskfs/QSD's rbd driver (higher is better for vdiskfs), medians."]
    return "\n".join(lines)


def main() -> None:
    require_root()
    options = parse_options(__doc__, "raw, read-qd16, qcow2-seq")
    repeat, runtime, opts = options.repeat, options.runtime, options.mount_opts
    all_rows = rows(runtime, SIZE_MIB)
    selected = select(all_rows, options.only)
    if not selected:
        sys.exit("--only selects no row")
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    print(f"repeat {repeat}, runtime {runtime} s, images {SIZE_MIB} MiB,"
          f" vdiskfs mount options {list(opts)}")
    measured: list[Measured] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rbd-bench-") as tmp, \
            start_cluster(Path(tmp) / "ceph") as cluster:
        print(f"cluster up in {cluster.start_seconds:.2f} s", flush=True)
        names = put_images(cluster, SIZE_MIB, Path(tmp))
        for row, fmt in selected:
            one = functools.partial(one_run, row=row, name=names[fmt], fmt=fmt, opts=opts)
            measured.append(measure(row, fmt, repeat, one))
    table = summary(measured, all_rows)
    print(f"\n{table}\n\n{len(measured)} rows in {(time.monotonic() - started) / 60:.1f} min")
    if options.json:
        options.json.write_text(json.dumps({
            "environment": env, "repeat": repeat, "runtime": runtime, "size_mib": SIZE_MIB,
            "vdiskfs_mount_opts": list(opts), "rows": [m.as_dict() for m in measured],
            "summary": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
