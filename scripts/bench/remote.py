#!/usr/bin/env python3
"""Remote benchmark (issue 12): a qcow2 over HTTP and NBD, vdiskfs vs qemu-storage-daemon.

One image, remote.qcow2 (384 MiB, 64 KiB clusters, fully allocated with pseudo-random data;
built once under ~/.cache/vdiskfs/bench), is served on loopback in two ways:
  http  nginx (tests/support/http_server.py's, on a free port), `http://127.0.0.1:P/...`
  nbd   qemu-nbd exporting the file's bytes (`-f raw`), `nbd://127.0.0.1:P/remote`
and both peers open the same URL with qcow2 on top: `vdiskfs mount URL` with its defaults
(the read cache filter on: format -> cache -> http/nbd), and qemu-storage-daemon 7.2 with its
`http` (curl, from qemu-block-extra, default readahead 256 KiB) or `nbd` driver under
`qcow2`, exported with `--export type=fuse`. Both servers run for the whole benchmark.
Rows (fio, as scripts/bench/peer.py's; `--only` terms in brackets, with http/nbd):
  [read-seq]   sequential 1 MiB reads of the whole disk, buffered (as `cat` reads)
  [read-qd1]   random 4 KiB reads, queue depth 1 (psync, O_DIRECT)
  [read-qd16]  random 4 KiB reads, queue depth 16 (libaio, O_DIRECT)
The page cache is dropped before every job (the servers' too, alike for both peers). Each
row alternates vdiskfs and QSD --repeat times and prints the median run of each with the
ratio vdiskfs/QSD, each daemon's CPU per GiB and per request, and vdiskfs's cache counters
(hits, misses, bytes fetched from the server) of the median run; a markdown table of the
rates and ratios ends the output, ready for the README.

QSD 7.2's curl driver now and then loses a request (the FUSE reader then waits for ever, QSD
idle, its connections quiet): a job still running HANG_LIMIT s past its runtime is ended by
aborting its FUSE connection, counted under "hangs", and run again on a fresh mount, at most
MAX_TRIES times (then the run counts as a rate of 0).

Usage: .venv/bin/python scripts/bench/remote.py [--repeat N] [--runtime S] [--quick]
           [--only TERMS] [--json FILE] [--vdiskfs-mount-opts="OPTS"]
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import (
    CACHE,
    FioHung,
    FioResult,
    MiB,
    Probe,
    build_random_qcow2,
    fio,
    probe,
    require_root,
)
from peer import (
    Measured,
    Row,
    Run,
    environment,
    measure,
    mount,
    parse_options,
    select,
)

from tests.support.http_server import start_nginx
from tests.support.nbd import qemu_nbd

SIZE = 384 * MiB
#: The --only term of each protocol and its name in the table.
PROTOCOLS = {"http": "HTTP (nginx)", "nbd": "NBD (qemu-nbd)"}
#: Seconds past a job's runtime after which it is taken as hung, and mounts tried per run.
HANG_LIMIT = 20
MAX_TRIES = 2


def rows(runtime: int) -> list[Row]:
    every = tuple(PROTOCOLS)
    rand = dict(rw="randread", bs="4k", runtime=runtime)
    return [
        Row("read-seq", "read seq 1 MiB", "MB/s",
            dict(rw="read", bs="1M", size=str(SIZE), direct=False), every),
        Row("read-qd1", "read 4 KiB qd1", "IOPS", rand, every),
        Row("read-qd16", "read 4 KiB qd16", "IOPS", {**rand, "iodepth": 16}, every),
    ]


@contextlib.contextmanager
def servers(image: Path) -> Iterator[dict[str, str]]:
    """nginx and qemu-nbd serving `image` on loopback for the whole run; the URL of each."""
    with tempfile.TemporaryDirectory(prefix="remote-", dir=CACHE) as tmp, \
            start_nginx(Path(tmp) / "nginx") as nginx, \
            qemu_nbd(image, "raw", export=image.stem) as nbd:
        # A hard link (same file system): nginx serves its root, the image stays where it is.
        os.link(image, nginx.root / image.name)
        yield {"http": nginx.url(image.name), "nbd": nbd.url}


def one_run(peer: str, row: Row, url: str, opts: tuple[str, ...], hangs: dict[str, int]
            ) -> Run:
    """One fio job on a fresh mount of `url`, tried again on a fresh mount when it hangs
    (counted in `hangs`): QSD 7.2's curl driver now and then loses a request, and its reader
    then waits for ever. After MAX_TRIES hangs the run counts as a rate of 0."""
    job = row.job
    limit = (0 if "size" in job else int(job["runtime"])) + HANG_LIMIT  # type: ignore[call-overload]
    for _ in range(MAX_TRIES):
        with mount(peer, url, False, opts) as m:
            try:
                result = fio(m, **job, limit=limit)  # type: ignore[arg-type]
            except FioHung as exc:
                hangs[peer] += 1
                print(f"  {exc}: connection aborted, mounting again", flush=True)
                continue
            return Run(result, probe(m))
    return Run(FioResult(0, 0, limit, 0.0), Probe(0, [], None))


def cache_line(measured: Measured) -> str:
    """vdiskfs's cache counters of its median run: what the reads cost on the wire."""
    median = measured.median("vdiskfs")
    run = next(r for r in measured.runs["vdiskfs"] if r.result is median)
    cache = next((n for n in run.probe.nodes if n.get("driver") == "cache"), None)
    if cache is None:
        return "no cache node"
    return (f"cache hits {cache['hits']} misses {cache['misses']} waits {cache['waits']}"
            f" | fetched {int(cache['bytes_fetched']) / MiB:.0f} MiB"  # type: ignore[call-overload]
            f" for {median.bytes / MiB:.0f} MiB read")


def summary(measured: list[Measured], hangs: list[dict[str, int]]) -> str:
    lines = [
        "| workload | protocol | vdiskfs | QSD | ratio | vdiskfs CPU/request (us) | hangs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, hung in zip(measured, hangs, strict=True):
        unit = m.row.unit
        ours, theirs = m.median("vdiskfs"), m.median("qsd")
        lines.append(f"| {m.row.title} | {PROTOCOLS[m.image]} | {ours.rate(unit):.0f} {unit}"
                     f" | {theirs.rate(unit):.0f} {unit} | {m.ratio:.2f}x"
                     f" | {ours.cpu_per_request * 1e6:.0f} | {hung['vdiskfs']} / {hung['qsd']} |")
    lines += ["", "Ratios are vdiskfs/QSD (above 1: vdiskfs faster); medians of the runs. Hangs"
              " (vdiskfs / QSD): jobs that made no progress and were mounted again."]
    return "\n".join(lines)


def main() -> None:
    require_root()
    options = parse_options(__doc__, "nbd, read-qd16, http-seq")
    repeat, runtime, opts = options.repeat, options.runtime, options.mount_opts
    selected = select(rows(runtime), options.only)
    if not selected:
        sys.exit("--only selects no row")

    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    image = build_random_qcow2("remote", SIZE)
    print(f"repeat {repeat}, runtime {runtime} s, vdiskfs mount options {list(opts)};"
          f" {image} ({image.stat().st_size / MiB:.0f} MiB file)")
    measured: list[Measured] = []
    hangs: list[dict[str, int]] = []
    started = time.monotonic()
    with servers(image) as urls:
        for row, protocol in selected:
            hangs.append({"vdiskfs": 0, "qsd": 0})
            one = functools.partial(one_run, row=row, url=urls[protocol], opts=opts,
                                    hangs=hangs[-1])
            measured.append(measure(row, protocol, repeat, one))
            print(f"{'':<34} {cache_line(measured[-1])}", flush=True)
    table = summary(measured, hangs)
    print(f"\n{table}\n\n{len(measured)} rows in {(time.monotonic() - started) / 60:.1f} min")
    if options.json:
        options.json.write_text(json.dumps({
            "environment": env, "repeat": repeat, "runtime": runtime,
            "vdiskfs_mount_opts": list(opts), "image": str(image), "urls": urls,
            "rows": [{**m.as_dict(), "hangs": h} for m, h in zip(measured, hangs, strict=True)],
            "summary": table,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
