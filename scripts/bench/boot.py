#!/usr/bin/env python3
"""Benchmark of ``vdiskfs boot``: how long the test kernel takes to reach init, and how fast the
guest kernel reads a virtio-blk disk served by the vdiskfs stack.

One boot of the test guest (scripts/guest/) with two disks: vda, the GPT/ext4 root (mounted
read-only), and vdb, a data disk of random bytes that the guest's init reads sequentially with
``dd bs=1M`` (``vdiskfs.readbench=/dev/vdb``) before powering off. Printed:

- host seconds from starting the VMM to "VFS: Mounted root" and to "Run /sbin/init";
- the guest's read throughput, through the page cache and with O_DIRECT (timed by the VMM
  between the guest's start/end marks), the requests the device saw and their average size;
- VM exits during the read, per MiB read (with ioeventfd and irqfd, a request costs the two
  MMIO exits of the interrupt acknowledgement).

No peer: QEMU 7.2 cannot boot this kernel where KVM is emulated (it stops at the first
emulation failure), so the figures are absolute. Usage:

    scripts/bench/boot.py [--data-mib 8] [--format raw|qcow2] [--memory 64M] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "scripts" / "guest"
MiB = 1 << 20


def _script(name: str, *args: str) -> str:
    proc = subprocess.run([str(GUEST / name), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _boot(args: list[str], timeout: float) -> tuple[dict[str, float], str, int]:
    """Run the VMM, timestamping console lines on the host; (marks, output, status)."""
    cmd = [sys.executable, "-m", "emulator", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    marks: dict[str, float] = {}
    lines: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        now = time.monotonic() - start
        for name, pattern in (("root_mounted", "VFS: Mounted root"),
                              ("run_init", " as init process")):
            if pattern in line:
                marks.setdefault(name, now)
        if time.monotonic() - start > timeout:
            proc.kill()
            break
    status = proc.wait()
    marks["end"] = time.monotonic() - start
    if status != 0:
        sys.stderr.write(proc.stderr.read().decode() if proc.stderr else "")
    return marks, "\n".join(lines), status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-mib", type=int, default=8, help="size of the disk read (MiB)")
    parser.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                        help="format of the data disk")
    parser.add_argument("--memory", default="64M")
    parser.add_argument("--kernel", help="kernel to boot (default: the test kernel)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    kernel = args.kernel or _script("build-kernel.sh").strip().splitlines()[-1]
    with tempfile.TemporaryDirectory(prefix="vdiskfs-bench-boot-") as tmp:
        work = Path(tmp)
        root = work / "root.raw"
        _script("build-rootfs.sh", str(root))
        data = work / "data.raw"
        with open(data, "wb") as f, open("/dev/urandom", "rb") as rnd:
            for _ in range(args.data_mib):
                f.write(rnd.read(MiB))
        if args.format == "qcow2":
            converted = work / "data.qcow2"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(data),
                            str(converted)], check=True)
            data = converted
        stats_path = work / "stats.json"
        marks, output, status = _boot([
            "--kernel", kernel, "--memory", args.memory,
            "--disk", f"{root},format=raw,readonly=on",
            "--disk", f"{data},format={args.format},readonly=on",
            "--append", "root=/dev/vda1 ro vdiskfs.readbench=/dev/vdb",
            "--stats", str(stats_path),
        ], args.timeout)
        if status != 0 or not stats_path.exists():
            print(output[-3000:])
            return 1
        stats = json.loads(stats_path.read_text())

    vm = stats["vm"]
    seconds = vm["console_milestones_s"]
    exits_at = vm.get("console_milestone_exits", {})
    blk = stats["data"]["virtio-blk"]
    read_bytes = args.data_mib * MiB
    dd_line = re.search(r"VDISKFS-GUEST: readbench (\d.*)", output)
    result: dict[str, object] = {
        "kvm_module": vm["kvm_module"],
        "kernel": kernel,
        "memory": args.memory,
        "data_disk": f"{args.data_mib} MiB {args.format}",
        "host_s_to_root_mounted": round(marks.get("root_mounted", float("nan")), 2),
        "host_s_to_run_init": round(marks.get("run_init", float("nan")), 2),
        "vcpu_s_to_run_init": seconds.get("run_init"),
        "host_s_total": round(marks["end"], 2),
        "guest_dd_records": dd_line.group(1).strip() if dd_line else None,
        "exits_to_run_init": exits_at.get("run_init"),
        "exits_total": vm["exits_total"],
        "exits_by_reason": vm["exits"],
        "read_requests": blk["read_requests"],
        "avg_request_kib": round(blk["read_bytes"] / max(blk["read_requests"], 1) / 1024, 1),
        "interrupts": blk["interrupts"],
        "queue_notifications": blk["queue_notifications"],
        "notify_exits": blk["notify_exits"],
    }
    for phase, label in (("readbench", "read"), ("readbench-direct", "read_direct")):
        start, end = f"{phase}-start", f"{phase}-end"
        if start in seconds and end in seconds:
            elapsed = seconds[end] - seconds[start]
            exits = exits_at[end] - exits_at[start]
            result[f"{label}_s"] = round(elapsed, 2)
            result[f"{label}_mib_per_s"] = round(read_bytes / MiB / elapsed, 3)
            result[f"{label}_exits"] = exits
            result[f"{label}_exits_per_mib"] = round(exits / (read_bytes / MiB), 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
