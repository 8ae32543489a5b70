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
#: Console lines whose first appearance is timed (seconds since the vCPU started), in the order
#: a boot reaches them: the kernel's own lines, and those of the initramfs that
#: scripts/guest/build-stock-initramfs.sh builds (scripts/guest/initramfs-init.sh). Without an
#: initramfs the kernel mounts the root itself ("VFS: Mounted root"); with one, "Run /init"
#: comes before the disk is found and the initramfs mounts the root. The clock starts at the
#: kernel's entry; its banner ("Linux version") comes out when the serial console registers
#: (the kernel replays its log then), so "console" times that.
MILESTONES: dict[str, bytes] = {
    "console": b"Linux version ",
    "run_init": b" as init process",
    "initramfs_modules_loaded": b"vdiskfs-initramfs: modules loaded",
    "disk_attached": b": [vda] ",
    "root_partition": b" vda: vda",
    "root_mounted": b"VFS: Mounted root",
    "initramfs_root_found": b"vdiskfs-initramfs: found root ",
    "initramfs_switch_root": b"vdiskfs-initramfs: switching root",
    "user_space": b"VDISKFS-GUEST: init running",
}
#: A guest may time its own phases: a line "VDISKFS-MARK <name>" is the milestone <name>.
GUEST_MARK = b"VDISKFS-MARK "


class ConsoleMonitor:
    """Feeds console bytes to ``sink`` and watches them line by line (vCPU thread)."""

    def __init__(self, sink: Callable[[bytes], None], stop: StopSignal,
                 clock: Callable[[], float] = time.monotonic,
                 counter: Callable[[], int] | None = None) -> None:
        self.sink = sink
        self.stop = stop
        self.clock = clock
        #: Read at each milestone (the VM's exit count), to attribute exits to a phase.
        self.counter = counter
        self.started = clock()
        self._line = bytearray()
        #: The panic message once one was printed.
        self.panic_reason: str | None = None
        #: Seconds from start to each milestone line.
        self.milestones: dict[str, float] = {}
        #: The counter's value at each milestone.
        self.milestone_counts: dict[str, int] = {}
        self.lines = 0

    def restart_clock(self) -> None:
        """Milestones count from now (when the vCPU starts)."""
        self.started = self.clock()

    def feed(self, data: bytes) -> None:
        self.sink(data)
        for byte in data:
            if byte == 0x0A:
                self._end_of_line(bytes(self._line).rstrip(b"\r"))
                self._line.clear()
            elif len(self._line) < MAX_LINE:
                self._line.append(byte)

    def _milestone(self, name: str) -> None:
        if name not in self.milestones:
            self.milestones[name] = round(self.clock() - self.started, 3)
            if self.counter is not None:
                self.milestone_counts[name] = self.counter()

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
