#!/usr/bin/env python3
"""Benchmark of ``vdiskfs boot``: how long a kernel takes to reach each boot milestone, what
each phase costs in VM exits, and how fast the guest kernel reads a virtio-blk disk served by
the vdiskfs stack.

One boot per kernel (the test guest's, scripts/guest/, unless ``--kernel`` names others) with
two disks: vda, the GPT/ext4 root (mounted read-only), and vdb, a data disk of random bytes
that the guest's init reads sequentially with ``dd bs=1M`` (``vdiskfs.readbench=/dev/vdb``)
before powering off. ``--cloud-image`` adds a boot without ``--kernel``: the kernel, initrd
and command line read from the image itself (by default the test disk with the test kernel
and a grub.cfg in its /boot, scripts/guest/build-cloud-image.sh; or a given IMAGE such as a
Debian cloud image, booted over a throwaway overlay).

With ``--initramfs-from DEB_OR_MODULES_DIR`` the ``--kernel`` boots go through the initramfs
that scripts/guest/build-stock-initramfs.sh builds from those modules (the root found by
``root=UUID=``); ``--stock`` boots Debian's stock cloud kernel that way
(scripts/guest/fetch-cloud-kernel.sh), the kernel and modules of one .deb, in 128M by default.
Where KVM is emulated the stock kernel takes minutes (``--stock --until partitions_read``).
Each boot prints its milestones on stderr as the console lines arrive (not with ``--json``);
``--until MILESTONE`` stops the guest once the console shows it (a success), ``--log FILE``
writes the console to FILE as it comes, each line after its host time (and ``== KERNEL``
before each boot's lines where there are several). Printed per boot:

- host seconds from starting the VMM to "VFS: Mounted root" and to "Run /sbin/init", and to
  every milestone of emulator/console.py the console showed;
- the VMM's setup (disks opened, kernel found in the image and loaded) before the vCPU runs;
- the milestones on the vCPU's clock -- kernel entry (the vCPU starts), console (the banner),
  the initramfs's modules loaded, devices found (vda attached), partitions read, a file
  system mounted, the initramfs's root found and switch_root, root mounted, init, user space
  -- and per phase between two of them the seconds, the VM exits and what they were (by exit
  reason, and port/MMIO accesses by device: ``pio:serial`` is the console's cost), the last
  phase running to the end of the run; a boot that does not end within ``--timeout`` (the
  deadline holds whether or not the guest prints) is stopped and reports how far it got and
  what it did since;
- the guest's read throughput, through the page cache and with O_DIRECT (timed by the VMM
  between the guest's start/end marks), the requests the device saw and their average size;
- VM exits during the read, per MiB read (with ioeventfd and irqfd, a request costs the two
  MMIO exits of the interrupt acknowledgement).

The exits tell what a phase would cost on hardware KVM, where an exit costs microseconds;
where KVM is emulated (kvm_pvm) most of the time is instructions emulated, not exits.
No peer: QEMU 7.2 cannot boot this kernel where KVM is emulated (it stops at the first
emulation failure), so the figures are absolute. Usage:

    scripts/bench/boot.py [--data-mib 8] [--format raw|qcow2] [--memory 64M] [--json]
                          [--kernel K]... [--cloud-image [IMAGE]] [--timeout S]
                          [--initramfs-from DEB_OR_MODULES_DIR] [--until MILESTONE]
                          [--log FILE]
    scripts/bench/boot.py --stock [--until partitions_read] [--timeout 900] [--log FILE]
    scripts/bench/boot.py --kernel VMLINUX --initramfs-from DEB_OR_MODULES_DIR
"""

from __future__ import annotations

import argparse
import itertools
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
#: Seconds a boot may take before it is stopped and reported as far as it got; Debian's stock
#: kernel under the emulated KVM (kvm_pvm) needs about 12 minutes to its root's init.
DEFAULT_TIMEOUT = 600.0
STOCK_TIMEOUT = 1500.0
#: Exit kinds shown per phase, the largest first.
TOP_KINDS = 4

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
          log: Path | None) -> tuple[dict[str, float], str, str, int]:
    """Run the VMM, timestamping console lines on the host; (marks, output, stderr, status).
    Stops the guest at milestone ``until`` or at the deadline, whichever comes first, with
    SIGTERM, so that the VMM still writes its statistics. The console is timed as it arrives
    (on stderr unless ``quiet``) and appended to ``log``."""
    cmd = [sys.executable, "-m", "emulator", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    lines_in: queue.Queue[bytes | None] = queue.Queue()
    errors: list[bytes] = []

    def read_console() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines_in.put(raw)
        lines_in.put(None)

    def read_errors() -> None:
        assert proc.stderr is not None
        errors.append(proc.stderr.read())

    # Threads: a guest that stops printing must not keep the deadline from being seen (the
    # console reader feeds a queue that is waited on with the time left), and a VMM that
    # writes much to stderr must not block on a full pipe.
    readers = [threading.Thread(target=read_console, daemon=True),
               threading.Thread(target=read_errors, daemon=True)]
    for reader in readers:
        reader.start()
    marks: dict[str, float] = {}
    lines: list[str] = []
    ended = False
    log_file = open(log, "a") if log is not None else None  # noqa: SIM115 (closed below)
    try:
        while (left := timeout - (time.monotonic() - start)) > 0:
            try:
                raw = lines_in.get(timeout=left)
            except queue.Empty:
                break
            if raw is None:
                ended = True
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
    for reader in readers:
        reader.join()
    # The console reader may have queued lines after the loop stopped: keep them.
    while not ended and (raw := lines_in.get()) is not None:
        lines.append(raw.decode(errors="replace").rstrip())
    marks["end"] = time.monotonic() - start
    return marks, "\n".join(lines), b"".join(errors).decode(errors="replace"), status


def phases(vm: dict[str, Any]) -> list[dict[str, Any]]:
    """The time and exits between consecutive milestones, in the order they were reached."""
    seconds: dict[str, float] = dict(vm.get("console_milestones_s", {}))
    counts: dict[str, int] = dict(vm.get("console_milestone_exits", {}))
    kinds: dict[str, dict[str, int]] = dict(vm.get("console_milestone_exits_by_kind", {}))
    order = sorted(seconds, key=lambda name: (seconds[name], counts.get(name, 0)))
    if order and "run_time_s" in vm:
        # The last phase runs to the end of the run: after the last milestone of a boot that
        # was stopped, it is what the guest was doing when it was.
        seconds["end"], counts["end"] = vm["run_time_s"], vm["exits_total"]
        kinds["end"] = {**vm["exits"],
                        **{f"pio:{k}": v for k, v in vm.get("pio_by_device", {}).items()},
                        **{f"mmio:{k}": v for k, v in vm.get("mmio_by_device", {}).items()}}
        order.append("end")
    out = []
    for first, second in itertools.pairwise(order):
        before, after = kinds.get(first, {}), kinds.get(second, {})
        # "io" and "mmio" exits are shown by device instead (pio:serial, mmio:<disk>).
        spent = {k: after[k] - before.get(k, 0) for k in after
                 if after[k] > before.get(k, 0) and k not in ("io", "mmio")}
        top = dict(sorted(spent.items(), key=lambda kv: -kv[1])[:TOP_KINDS])
        out.append({"phase": f"{first} -> {second}",
                    "s": round(seconds[second] - seconds[first], 3),
                    "exits": counts.get(second, 0) - counts.get(first, 0),
                    "exits_by_kind": top})
    return out


def boot_report(stats: dict[str, Any], marks: dict[str, float], status: int,
                until: str | None) -> dict[str, Any]:
    """What every boot reports: milestones and phases, whether or not it reached init."""
    vm = stats["vm"]
    seconds = vm.get("console_milestones_s", {})
    reached = max(seconds, key=lambda n: seconds[n]) if seconds else None
    return {
        "kvm_module": vm["kvm_module"],
        "status": status,
        "outcome": (vm.get("outcome") or {}).get("reason"),
        "stopped_at": until if until is not None and until in marks else "end",
        "host_s_to_root_mounted": round(marks.get("root_mounted", float("nan")), 2),
        "host_s_to_run_init": round(marks.get("run_init", float("nan")), 2),
        "vcpu_s_to_run_init": seconds.get("run_init"),
        "host_s_total": round(marks["end"], 2),
        # In the order reached (marks are added as the lines arrive).
        "milestones_host_s": {name: round(at, 2) for name, at in marks.items()
                              if name in MILESTONES},
        "vmm_setup_s": vm.get("setup_s"),
        "boot_find_s": vm.get("boot_find_s"),
        "reached": f"{reached} at {seconds[reached]} s" if reached else "nothing",
        "milestones_vcpu_s": seconds,
        "phases": phases(vm),
        "exits_to_run_init": vm.get("console_milestone_exits", {}).get("run_init"),
        "exits_total": vm["exits_total"],
        "exits_by_reason": vm["exits"],
    }


def read_report(stats: dict[str, Any], output: str, data_mib: int) -> dict[str, Any]:
    """The data disk's figures: what the guest read, at what rate, for how many exits."""
    vm = stats["vm"]
    seconds = vm["console_milestones_s"]
    exits_at = vm.get("console_milestone_exits", {})
    blk = stats["data"]["virtio-blk"]
    read_bytes = data_mib * MiB
    dd_line = re.search(r"VDISKFS-GUEST: readbench (\d.*)", output)
    result: dict[str, Any] = {
        "guest_dd_records": dd_line.group(1).strip() if dd_line else None,
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
    return result


def _how_far(marks: dict[str, float], timeout: float) -> str:
    """For a run without statistics: the milestones its console showed, and those it did not."""
    lines = [f"boot: stopped after {marks['end']:.1f} s (time limit {timeout:.0f} s)"]
    lines += [f"  {name:<26} host {marks[name]:7.1f} s" for name in MILESTONES if name in marks]
    missed = [name for name in MILESTONES if name not in marks]
    if missed:
        lines.append(f"  not reached: {', '.join(missed)}")
    return "\n".join(lines)


def run_one(work: Path, name: str, boot_args: list[str], data: Path,
            args: argparse.Namespace, header: str | None) -> dict[str, Any] | None:
    """One boot and its report; None where the VMM wrote no statistics."""
    stats_path = work / f"stats-{name}.json"
    if args.log is not None and header is not None:
        with open(args.log, "a") as log:
            log.write(f"== {header}\n")
    marks, output, stderr, status = _boot([
        *boot_args, "--memory", args.memory,
        "--disk", f"{data},format={args.format},readonly=on",
        "--stats", str(stats_path),
    ], args.timeout, args.until, args.json, args.log)
    if not stats_path.exists():
        print(output[-3000:])
        sys.stderr.write(stderr[-3000:])
        print(_how_far(marks, args.timeout), file=sys.stderr)
        return None
    stats = json.loads(stats_path.read_text())
    if status != 0 and args.until not in marks:
        sys.stderr.write(stderr[-3000:])
    chosen = stats["vm"].get("boot")
    result: dict[str, Any] = {
        "kernel": chosen["kernel"] if chosen else boot_args[boot_args.index("--kernel") + 1],
        "initramfs_from": args.initramfs_from if "--initrd" in boot_args else None,
        "memory": args.memory,
        "data_disk": f"{args.data_mib} MiB {args.format}",
    }
    if chosen:
        result["chosen_by"] = chosen["chosen_by"]
        result["cmdline"] = chosen["cmdline"]
    result.update(boot_report(stats, marks, status, args.until))
    if "data" in stats:
        result.update(read_report(stats, output, args.data_mib))
    return result


def print_text(result: dict[str, Any]) -> None:
    tables = ("phases", "milestones_vcpu_s", "milestones_host_s")
    shown = {k: v for k, v in result.items() if k not in tables}
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        print(f"{key:<{width}}  {value}")
    for clock in ("host", "vCPU"):
        print(f"milestones ({clock} seconds):", ", ".join(
            f"{k} {v}" for k, v in result[f"milestones_{clock.lower()}_s"].items()) or "none")
    for phase in result["phases"]:
        kinds = ", ".join(f"{k} {v}" for k, v in phase["exits_by_kind"].items())
        print(f"  {phase['phase']:<48} {phase['s']:>9.3f} s {phase['exits']:>9} exits"
              f"{f' ({kinds})' if kinds else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-mib", type=int, default=8, help="size of the disk read (MiB)")
    parser.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                        help="format of the data disk")
    parser.add_argument("--memory", help="guest RAM (default 64M, 128M with --stock)")
    parser.add_argument("--kernel", action="append",
                        help="kernel to boot (default: the test kernel); repeatable")
    parser.add_argument("--cloud-image", nargs="?", const="", metavar="IMAGE",
                        help="also boot without --kernel, the kernel found in the image: IMAGE "
                        "(over a throwaway overlay), or the test disk with the test kernel "
                        "and a grub.cfg in /boot")
    parser.add_argument("--initramfs-from", metavar="DEB_OR_MODULES_DIR",
                        help="boot each --kernel through the initramfs built from these "
                        "modules (scripts/guest/build-stock-initramfs.sh), root=UUID=")
    parser.add_argument("--stock", action="store_true",
                        help="boot Debian's stock cloud kernel with the initramfs from its .deb")
    parser.add_argument("--until", choices=list(MILESTONES), metavar="MILESTONE",
                        help="stop the guest once it reaches MILESTONE, a success (one of: "
                        f"{', '.join(MILESTONES)})")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="stop a boot after this many seconds and report how far it got "
                        f"(default {DEFAULT_TIMEOUT:g}, with --stock {STOCK_TIMEOUT:g}: where "
                        "KVM is emulated, Debian's cloud kernel reads its partitions after "
                        "about 11 minutes)")
    parser.add_argument("--log", type=Path, metavar="FILE",
                        help="write the console to FILE as it comes, each line after its host "
                        "time in seconds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.stock and (args.kernel or args.initramfs_from):
        parser.error("--stock brings its own kernel and modules: no --kernel, --initramfs-from")

    if args.stock:
        args.kernel = [_last_line(_script("fetch-cloud-kernel.sh"))]
        args.initramfs_from = _last_line(_script("fetch-cloud-kernel.sh", "--deb"))
    args.memory = args.memory or ("128M" if args.stock else "64M")
    if args.timeout is None:
        args.timeout = STOCK_TIMEOUT if args.stock else DEFAULT_TIMEOUT
    need_test_kernel = not args.kernel or args.cloud_image == ""
    test_kernel = _last_line(_script("build-kernel.sh")) if need_test_kernel else None
    kernels: list[str] = args.kernel or [test_kernel]
    if args.log is not None:
        args.log.write_text("")
    results: list[dict[str, Any] | None] = []
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
        initrd_args: list[str] = []
        root_arg = "root=/dev/vda1"
        if args.initramfs_from:
            initrd_args = ["--initrd", _last_line(_script("build-stock-initramfs.sh",
                                                          args.initramfs_from))]
            root_arg = f"root=UUID={_root_uuid(root)}"
        several = len(kernels) + (args.cloud_image is not None) > 1
        for index, kernel in enumerate(kernels):
            results.append(run_one(work, f"k{index}", [
                "--kernel", kernel, *initrd_args, "--disk", f"{root},format=raw,readonly=on",
                "--append", f"{root_arg} ro vdiskfs.readbench=/dev/vdb"], data, args,
                kernel if several else None))
        if args.cloud_image is not None:
            image = args.cloud_image
            if not image:
                assert test_kernel is not None
                image = str(work / "cloud.qcow2")
                _script("build-cloud-image.sh", image, str(Path(test_kernel).parent))
            results.append(run_one(work, "cloud", [
                "--disk", f"{image},overlay={work / 'cloud-run.qcow2'}",
                "--append", "vdiskfs.readbench=/dev/vdb"], data, args,
                f"cloud image {image}" if several else None))

    done = [r for r in results if r is not None]
    if args.json:
        print(json.dumps(done[0] if len(results) == 1 and done else done, indent=2))
    else:
        for index, result in enumerate(done):
            if len(results) > 1:
                print(f"{'' if index == 0 else chr(10)}== {result['kernel']}")
            print_text(result)
    ok = all(r["status"] == 0 or r["stopped_at"] == args.until for r in done)
    return 0 if len(done) == len(results) and ok else 1


if __name__ == "__main__":
    sys.exit(main())
