"""How the console tells the VMM that the guest ended, and what it achieved."""

from __future__ import annotations

from emulator.console import ConsoleMonitor
from emulator.outcome import OutcomeKind, StopSignal


def feed(lines: list[bytes]) -> tuple[ConsoleMonitor, StopSignal, bytearray]:
    out = bytearray()
    stop = StopSignal()
    times = iter(range(100))
    monitor = ConsoleMonitor(out.extend, stop, clock=lambda: float(next(times)))
    for line in lines:
        # Split mid-line: the serial port delivers one byte at a time.
        monitor.feed(line[:5])
        monitor.feed(line[5:])
    return monitor, stop, out


def test_output_passes_through_and_milestones_are_timed() -> None:
    monitor, stop, out = feed([b"[ 1.0] VFS: Mounted root (ext4 filesystem)\r\n",
                               b"[ 2.0] Run /sbin/init as init process\r\n"])
    assert out.startswith(b"[ 1.0] VFS")
    assert monitor.milestones == {"root_mounted": 1.0, "run_init": 2.0}
    assert not stop.is_set()


def test_panic_end_line_stops_with_the_reason() -> None:
    monitor, stop, _ = feed([
        b"[ 3.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\r\n",
        b"[ 3.2] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\r\n",
    ])
    assert monitor.panic_reason == "Attempted to kill init! exitcode=0x0000000b"
    assert stop.outcome is not None and stop.outcome.kind == OutcomeKind.PANIC
    assert stop.outcome.status != 0
    assert "Attempted to kill init" in stop.outcome.reason


def test_halt_is_a_clean_poweroff() -> None:
    _, stop, _ = feed([b"[ 9.9] reboot: System halted\r\n"])
    assert stop.outcome is not None and stop.outcome.kind == OutcomeKind.POWEROFF
    assert stop.outcome.status == 0


def test_first_stop_reason_wins() -> None:
    stop = StopSignal()
    calls: list[int] = []
    stop.add_listener(lambda: calls.append(1))
    assert stop.stop(OutcomeKind.REBOOT, "first")
    assert not stop.stop(OutcomeKind.PANIC, "second")
    assert stop.outcome is not None and stop.outcome.reason == "first"
    assert calls == [1]


def test_long_lines_are_bounded() -> None:
    monitor, _, out = feed([b"x" * 100_000 + b"\n"])
    assert len(out) == 100_001 and monitor.lines == 1


def test_an_initramfs_boot_is_timed_at_each_step() -> None:
    """The kernel's lines and those of scripts/guest/initramfs-init.sh (a stock kernel's boot)."""
    monitor, _, _ = feed([
        b"[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org)\n",
        b"[   30.1] Run /init as init process\n",
        b"vdiskfs-initramfs: virtio_blk loaded (41.20 s)\n",
        b"vdiskfs-initramfs: modules loaded (41.30 s)\n",
        b"[   41.0] virtio_blk virtio0: [vda] 53248 512-byte logical blocks (27.3 MB/26.0 MiB)\n",
        b"[   41.1]  vda: vda1 vda2\n",
        b"vdiskfs-initramfs: found root /dev/vda1 (root=UUID=0b1e) (42.00 s)\n",
        b"vdiskfs-initramfs: switching root to /sbin/init (43.00 s)\n",
        b"VDISKFS-GUEST: init running as pid 1\n",
    ])
    assert list(monitor.milestones) == [
        "console", "run_init", "initramfs_modules_loaded", "devices_found",
        "partitions_read", "initramfs_root_found", "initramfs_switch_root", "user_space"]


def test_guest_marks_are_milestones_with_counts() -> None:
    out = bytearray()
    counts = iter([10, 25])
    monitor = ConsoleMonitor(out.extend, StopSignal(), counter=lambda: next(counts))
    monitor.feed(b"VDISKFS-MARK readbench-start\r\nnoise\nVDISKFS-MARK readbench-end\n")
    assert set(monitor.milestones) == {"readbench-start", "readbench-end"}
    assert monitor.milestone_counts == {"readbench-start": 10, "readbench-end": 25}


def test_boot_milestones_snapshot_the_exits_by_kind() -> None:
    out = bytearray()
    exits = {"io": 0}
    times = iter(range(100))

    def count() -> int:
        exits["io"] += 5
        return exits["io"]

    monitor = ConsoleMonitor(out.extend, StopSignal(), clock=lambda: float(next(times)),
                             counter=count, breakdown=lambda: dict(exits))
    monitor.restart_clock()
    monitor.feed(b"[ 0.0] Linux version 6.1.0 (x@y)\n"
                 b"[ 1.0] virtio_blk virtio0: [vda] 51200 512-byte logical blocks\n"
                 b"[ 1.1]  vda: vda1 vda2\n"
                 b"[ 2.0] EXT4-fs (vda1): mounted filesystem with ordered data mode.\n"
                 b"[ 2.1] VFS: Mounted root (ext4 filesystem) readonly on device 254:1.\n"
                 b"[ 3.0] Run /sbin/init as init process\n")
    assert list(monitor.milestones) == ["kernel_entry", "console", "devices_found",
                                        "partitions_read", "fs_mounted", "root_mounted",
                                        "run_init"]
    assert monitor.milestones["kernel_entry"] == 0.0
    assert monitor.milestone_counts["kernel_entry"] == 5
    assert monitor.milestone_breakdowns["run_init"] == {"io": 35}
