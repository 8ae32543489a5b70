"""Watching the guest's serial console: pass the bytes on, and notice what the kernel says
about its own end (panic, halt) and its milestones (root mounted, init started).

A kernel without ACPI cannot power the machine off: ``poweroff`` ends in "reboot: System
halted" (or "Power down") with the CPU halted for good, so that line is how the VMM learns the
guest is done. A panic prints "Kernel panic - not syncing: <why>", whose reason becomes the
one-line outcome; with the VMM's default ``panic=-1`` the kernel then resets through the i8042
(the VMM tells it from a plain reboot by the warm-reboot flag), otherwise it prints the "end
Kernel panic" line and spins, and that line ends the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from emulator.outcome import OutcomeKind, StopSignal

__all__ = ["ConsoleMonitor"]

#: Longest line kept for matching; the rest of a longer line is passed on but not examined.
MAX_LINE = 4096

PANIC_MARK = b"Kernel panic - not syncing: "
PANIC_END_MARK = b"---[ end Kernel panic - not syncing"
HALT_MARKS = (b"reboot: System halted", b"reboot: Power down")
#: Console lines whose first appearance is timed (seconds since the vCPU started, which is
#: the milestone "kernel_entry"), in the order a boot without an initramfs reaches them: the
#: kernel's early boot until its console registers and prints the banner (the kernel replays
#: its log then), driver probing until the first disk attaches, the partition scan (the first
#: reads through the stack), then the root file system. With an initramfs (the one
#: scripts/guest/build-stock-initramfs.sh builds, scripts/guest/initramfs-init.sh), "Run /init"
#: comes first and the initramfs's own lines time its steps. A phase between two is what the
#: benchmark (scripts/bench/boot.py) reports.
MILESTONES: dict[str, bytes] = {
    "console": b"Linux version ",
    "initramfs_modules_loaded": b"vdiskfs-initramfs: modules loaded",
    "devices_found": b": [vda] ",
    "partitions_read": b" vda:",
    # "EXT4-fs (vda1): mounted filesystem": also a root that an initramfs mounts.
    "fs_mounted": b"): mounted filesystem",
    "initramfs_root_found": b"vdiskfs-initramfs: found root ",
    "initramfs_switch_root": b"vdiskfs-initramfs: switching root",
    "root_mounted": b"VFS: Mounted root",
    "run_init": b" as init process",
    "user_space": b"VDISKFS-GUEST: init running",
}
KERNEL_ENTRY = "kernel_entry"
#: A guest may time its own phases: a line "VDISKFS-MARK <name>" is the milestone <name>.
GUEST_MARK = b"VDISKFS-MARK "


class ConsoleMonitor:
    """Feeds console bytes to ``sink`` and watches them line by line (vCPU thread)."""

    def __init__(self, sink: Callable[[bytes], None], stop: StopSignal,
                 clock: Callable[[], float] = time.monotonic,
                 counter: Callable[[], int] | None = None,
                 breakdown: Callable[[], dict[str, int]] | None = None) -> None:
        self.sink = sink
        self.stop = stop
        self.clock = clock
        #: Read at each milestone (the VM's exit count), to attribute exits to a phase.
        self.counter = counter
        #: Read at each milestone too: the exits by reason and device, for phases.
        self.breakdown = breakdown
        self.started = clock()
        self._line = bytearray()
        #: The panic message once one was printed.
        self.panic_reason: str | None = None
        #: Seconds from start to each milestone line.
        self.milestones: dict[str, float] = {}
        #: The counter's value at each milestone.
        self.milestone_counts: dict[str, int] = {}
        #: The breakdown's value at each milestone.
        self.milestone_breakdowns: dict[str, dict[str, int]] = {}
        self.lines = 0

    def restart_clock(self) -> None:
        """Milestones count from now: the vCPU starts at the kernel's entry point."""
        self.started = self.clock()
        self._milestone(KERNEL_ENTRY, self.started)

    def feed(self, data: bytes) -> None:
        self.sink(data)
        for byte in data:
            if byte == 0x0A:
                self._end_of_line(bytes(self._line).rstrip(b"\r"))
                self._line.clear()
            elif len(self._line) < MAX_LINE:
                self._line.append(byte)

    def _milestone(self, name: str, now: float | None = None) -> None:
        if name not in self.milestones:
            now = self.clock() if now is None else now
            self.milestones[name] = round(now - self.started, 3)
            if self.counter is not None:
                self.milestone_counts[name] = self.counter()
            if self.breakdown is not None:
                self.milestone_breakdowns[name] = self.breakdown()

    def _end_of_line(self, line: bytes) -> None:
        self.lines += 1
        for name, mark in MILESTONES.items():
            if mark in line:
                self._milestone(name)
        if line.startswith(GUEST_MARK):
            name = line[len(GUEST_MARK):].decode("ascii", "replace").strip()[:64]
            if name:
                self._milestone(name)
        if self.panic_reason is None and PANIC_MARK in line:
            self.panic_reason = line.split(PANIC_MARK, 1)[1].decode("utf-8", "replace").strip()
        if PANIC_END_MARK in line:
            self.stop.stop(OutcomeKind.PANIC, f"guest panic: {self.panic_reason or '?'}")
        elif any(mark in line for mark in HALT_MARKS):
            self.stop.stop(OutcomeKind.POWEROFF, "guest powered off")
