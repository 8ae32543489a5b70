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

With ``--initramfs-from DEB_OR_MODULES_DIR`` the kernel boots through the initramfs that
scripts/guest/build-stock-initramfs.sh builds from those modules (the root found by
``root=UUID=``); ``--stock`` boots Debian's stock cloud kernel that way
(scripts/guest/fetch-cloud-kernel.sh), the kernel and modules of one .deb. Each run prints the
time to every milestone of the boot it reached (emulator/console.py: kernel entry, /init, the
initramfs's modules, the disk attached, its partitions, the root found and mounted, user space),
on the host's clock as the lines arrive and on the VMM's; with ``--until MILESTONE`` the guest
is stopped there (success), and at ``--timeout`` a run stops and says how far it got. Where KVM
is emulated the stock kernel takes minutes (``--stock --until root_partition``).

No peer: QEMU 7.2 cannot boot this kernel where KVM is emulated (it stops at the first
emulation failure), so the figures are absolute. Usage:

    scripts/bench/boot.py [--data-mib 8] [--format raw|qcow2] [--memory 64M] [--json]
    scripts/bench/boot.py --stock [--until root_partition] [--timeout 900] [--log FILE]
    scripts/bench/boot.py --kernel VMLINUX --initramfs-from DEB_OR_MODULES_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "scripts" / "guest"
MiB = 1 << 20

sys.path.insert(0, str(REPO))
from emulator.console import MILESTONES  # noqa: E402  (the checkout's, not an installed one)


def _script(name: str, *args: str) -> str:
    proc = subprocess.run([str(GUEST / name), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _root_uuid(disk: Path) -> str:
    """The UUID of the ext4 on partition 1 (1 MiB in) of build-rootfs.sh's disk."""
    return subprocess.run(["blkid", "-p", "-O", str(MiB), "-o", "value", "-s", "UUID",
                           str(disk)], capture_output=True, text=True, check=True).stdout.strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the VMM's group (it writes its statistics and closes its images), then KILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _boot(args: list[str], timeout: float, until: str | None, quiet: bool,
          log: Path | None) -> tuple[dict[str, float], str, int]:
    """Run the VMM, timestamping console lines on the host; (marks, output, status). Stops the
    guest at milestone ``until`` or at the deadline, whichever comes first; a line arrives or
    not, the deadline holds (a reader thread feeds a queue)."""
    cmd = [sys.executable, "-m", "emulator", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    lines_in: queue.Queue[bytes | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines_in.put(raw)
        lines_in.put(None)

    threading.Thread(target=read, daemon=True).start()
    marks: dict[str, float] = {}
    lines: list[str] = []
    log_file = open(log, "w") if log is not None else None  # noqa: SIM115 (closed below)
    try:
        while (left := timeout - (time.monotonic() - start)) > 0:
            try:
                raw = lines_in.get(timeout=left)
            except queue.Empty:
                break
            if raw is None:
                break
            now = time.monotonic() - start
            lines.append(raw.decode(errors="replace").rstrip())
            if log_file is not None:
                log_file.write(f"{now:8.1f} {lines[-1]}\n")
                log_file.flush()
            for name, pattern in MILESTONES.items():
                if pattern in raw and name not in marks:
                    marks[name] = now
                    if not quiet:
                        print(f"boot: {now:7.1f} s  {name}", file=sys.stderr, flush=True)
            if until is not None and until in marks:
                break
    finally:
        _stop(proc)
        if log_file is not None:
            log_file.close()
    status = proc.wait()
    marks["end"] = time.monotonic() - start
    if status != 0 and until not in marks:
        sys.stderr.write(proc.stderr.read().decode() if proc.stderr else "")
    return marks, "\n".join(lines), status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-mib", type=int, default=8, help="size of the disk read (MiB)")
    parser.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                        help="format of the data disk")
    parser.add_argument("--memory", help="guest RAM (default 64M, 128M with --stock)")
    parser.add_argument("--kernel", help="kernel to boot (default: the test kernel)")
    parser.add_argument("--initramfs-from", metavar="DEB_OR_MODULES_DIR",
                        help="boot through the initramfs built from these modules "
                        "(scripts/guest/build-stock-initramfs.sh), root=UUID=")
    parser.add_argument("--stock", action="store_true",
                        help="Debian's stock cloud kernel with the initramfs from its .deb")
    parser.add_argument("--until", choices=sorted(MILESTONES), metavar="MILESTONE",
                        help="stop the guest once it reaches MILESTONE (one of: "
                        f"{', '.join(MILESTONES)})")
    parser.add_argument("--timeout", type=float, default=600,
                        help="stop the guest after this many seconds (default 600)")
    parser.add_argument("--log", type=Path, metavar="FILE",
                        help="write the console to FILE as it comes, each line after its host "
                        "time in seconds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.stock and (args.kernel or args.initramfs_from):
        parser.error("--stock brings its own kernel and modules: no --kernel, --initramfs-from")

    if args.stock:
        args.kernel = _last_line(_script("fetch-cloud-kernel.sh"))
        args.initramfs_from = _last_line(_script("fetch-cloud-kernel.sh", "--deb"))
    memory = args.memory or ("128M" if args.stock else "64M")
    kernel = args.kernel or _last_line(_script("build-kernel.sh"))
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
        boot_args = ["--kernel", kernel, "--memory", memory]
        root_arg = "root=/dev/vda1"
        if args.initramfs_from:
            initramfs = _last_line(_script("build-stock-initramfs.sh", args.initramfs_from))
            boot_args += ["--initrd", initramfs]
            root_arg = f"root=UUID={_root_uuid(root)}"
        stats_path = work / "stats.json"
        marks, output, status = _boot([
            *boot_args,
            "--disk", f"{root},format=raw,readonly=on",
            "--disk", f"{data},format={args.format},readonly=on",
            "--append", f"{root_arg} ro vdiskfs.readbench=/dev/vdb",
            "--stats", str(stats_path),
        ], args.timeout, args.until, args.json, args.log)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else None

    reached_until = args.until is not None and args.until in marks
    if stats is None or (status != 0 and not reached_until):
        print(output[-3000:])
        print(_how_far(marks, stats, args.timeout), file=sys.stderr)
        return 1
    vm = stats["vm"]
    seconds = vm["console_milestones_s"]
    exits_at = vm.get("console_milestone_exits", {})
    blk = stats["data"]["virtio-blk"]
    read_bytes = args.data_mib * MiB
    dd_line = re.search(r"VDISKFS-GUEST: readbench (\d.*)", output)
    result: dict[str, object] = {
        "kvm_module": vm["kvm_module"],
        "kernel": kernel,
        "initramfs_from": args.initramfs_from,
        "memory": memory,
        "data_disk": f"{args.data_mib} MiB {args.format}",
        "stopped_at": args.until if reached_until else "end",
        "host_s_to_root_mounted": round(marks.get("root_mounted", float("nan")), 2),
        "host_s_to_run_init": round(marks.get("run_init", float("nan")), 2),
        "vcpu_s_to_run_init": seconds.get("run_init"),
        "milestones_host_s": {name: round(marks[name], 2) for name in MILESTONES
                              if name in marks},
        "milestones_vcpu_s": {name: seconds[name] for name in MILESTONES if name in seconds},
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


def _how_far(marks: dict[str, float], stats: dict[str, Any] | None, timeout: float) -> str:
    """Which milestones a run that did not end well reached, when, and the first it missed."""
    vcpu = stats["vm"]["console_milestones_s"] if stats else {}
    lines = [f"boot: stopped after {marks['end']:.1f} s (time limit {timeout:.0f} s)"]
    for name in MILESTONES:
        if name in marks:
            lines.append(f"  {name:<26} host {marks[name]:7.1f} s   vCPU "
                         f"{vcpu.get(name, float('nan')):7.1f} s")
    missed = [name for name in MILESTONES if name not in marks]
    if missed:
        lines.append(f"  not reached: {', '.join(missed)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
