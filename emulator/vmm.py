"""The VMM: one x86_64 VM with a serial console and virtio-blk disks served by the vdiskfs
stack, wired together and run.

Threads and loops:

- the **vCPU thread** blocks in ``KVM_RUN`` and serves register accesses (serial, i8042, CMOS,
  virtio-mmio registers) synchronously;
- the **trio loop** (the main thread) owns the block stack: each virtio-blk device serves its
  queue there, woken by an eventfd that KVM signals on a queue notification (ioeventfd) or
  that the vCPU thread writes when the notification reached user space; completions interrupt
  the guest through an irqfd (or ``KVM_IRQ_LINE``). The same nodes also serve the FUSE view
  (``--mount``), so one set of caches and statistics sees everything;
- the stop signal (:class:`~emulator.outcome.StopSignal`) ends the run from wherever the end is
  noticed: a vCPU exit, the console, the i8042 reset line, a signal, the user's escape key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from emulator.arch.x86_64 import acpi, layout, regs
from emulator.arch.x86_64.e820 import memory_map
from emulator.console import ConsoleMonitor
from emulator.devices.bus import Bus
from emulator.devices.cmos import Cmos
from emulator.devices.eventfd import EventFd
from emulator.devices.i8042 import I8042
from emulator.devices.irq import InterruptLine
from emulator.devices.serial import Serial
from emulator.devices.virtio.block.backend import BlockBackend
from emulator.devices.virtio.block.device import BlockDevice
from emulator.devices.virtio.mmio import MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET, MmioTransport
from emulator.guestboot import BootChoice, find_boot
from emulator.kvm import abi, pvm
from emulator.kvm.vcpu import Vcpu, VcpuLoop, install_kick_handler
from emulator.kvm.vm import IrqfdLine, Kvm, KvmFlavor, KvmIrqLine, Vm
from emulator.loader import (
    LoadedKernel,
    load_initrd,
    load_initrd_bytes,
    load_kernel,
    load_kernel_image,
)
from emulator.loader.bootparams import BootConfig, write_boot_params
from emulator.loader.cmdline import Cmdline
from emulator.memory import GuestMemory
from emulator.outcome import Outcome, OutcomeKind, StopSignal
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import redact_url
from vdiskfs.drivers.filter.throttle import ThrottleGroups, throttled
from vdiskfs.drivers.filter.throttle_buckets import ThrottleSpec
from vdiskfs.errors import ReadOnlyError, UnsupportedError, VdiskError
from vdiskfs.overlay import open_overlay
from vdiskfs.urlargs import RemoteOptions

__all__ = ["DiskConfig", "VmConfig", "Vmm"]

log = logging.getLogger(__name__)

#: Ctrl-A, then "x": leave the VM from an interactive console (as QEMU's -nographic).
ESCAPE_BYTE = 0x01
ESCAPE_QUIT = ord("x")


@dataclass
class DiskConfig:
    """One ``--disk IMAGE[,format=F][,readonly=on][,overlay=NEW.qcow2][,snapshot=NAME]``
    ``[,throttle.KEY=V]...``; IMAGE may be a URL (``https://...``, ``nbd://...``)."""

    path: str
    format: str | None = None
    read_only: bool = False
    overlay: str | None = None
    #: Boot the image's internal snapshot of this ID or name (read-only).
    snapshot: str | None = None
    #: ``throttle.*``: limits over the disk, in its own budget or a ``throttle.group``.
    throttle: ThrottleSpec | None = None


@dataclass
class VmConfig:
    #: The kernel file; None: the one the first disk would boot (emulator.guestboot), with
    #: its initrd and command line (``append`` is added to that).
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    memory: int = 256 << 20
    disks: list[DiskConfig] = field(default_factory=list)
    #: TLS and read-cache options of the disks opened by URL (as for ``vdiskfs mount``).
    remote: RemoteOptions = field(default_factory=RemoteOptions)
    #: "stdio" or a file to write the console to.
    serial: str = "stdio"
    mountpoint: str | None = None
    stats_file: str | None = None
    #: How queue notifications reach the device: "ioeventfd" (in the kernel) or "exit".
    virtio_notify: str = "ioeventfd"
    #: How device interrupts reach the guest: "irqfd" or "ioctl" (KVM_IRQ_LINE).
    virtio_irq: str = "irqfd"


@dataclass
class _Disk:
    name: str
    config: DiskConfig
    node: BlockNode
    device: BlockDevice | None = None
    kick: EventFd | None = None
    irq_eventfd: EventFd | None = None
    base: int = 0
    irq: int = 0


def _unique_names(paths: list[str]) -> list[str]:
    """A name per disk for its statistics, its file under ``--mount`` and its virtio serial:
    the stem that ``vdiskfs mount`` gives the image (for a URL, never its credentials)."""
    from vdiskfs.fs.daemon import image_stem

    names: list[str] = []
    for path in paths:
        # The mount's rule: a URL or rbd: name by its image, not by its last path component
        # (rbd:pool/vm:conf=/etc/ceph/ceph.conf is "vm", not "ceph").
        stem = image_stem(path) or "disk"
        name, n = stem, 1
        while name in names:
            name = f"{stem}-{n}"
            n += 1
        names.append(name)
    return names


async def _open_overlay(disk: DiskConfig, options: OpenOptions) -> BlockNode:
    """``overlay=NEW.qcow2``: the guest writes go to the overlay (created over the image, or
    continued), the image stays as it was -- the same overlay as ``vdiskfs mount --overlay``
    (so over an ``nbd://`` image, not over an ``https://`` one)."""
    assert disk.overlay is not None
    if disk.read_only:
        raise UnsupportedError("readonly=on and overlay= together: the overlay exists to be "
                               "written", path=redact_url(disk.path))
    return await open_overlay(disk.path, disk.overlay, options)


class Vmm:
    """Build and run one VM from a :class:`VmConfig`."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.stop = StopSignal()
        self.disks: list[_Disk] = []
        #: The VM's throttle groups: disks share a budget only when they name one.
        self.throttle_groups = ThrottleGroups()
        self.memory: GuestMemory | None = None
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.vcpu: Vcpu | None = None
        self.loop: VcpuLoop | None = None
        self.serial: Serial | None = None
        self.console: ConsoleMonitor | None = None
        self.kernel: LoadedKernel | None = None
        self.cmdline = ""
        #: What was found on the disk when no --kernel was given.
        self.boot_choice: BootChoice | None = None
        self.flavor = KvmFlavor("unknown")
        self._output_fd = -1
        self._close_output = False
        self._run_started = 0.0
        #: Seconds from run() to the vCPU's start (disks opened, kernel found and loaded), and
        #: of those, finding and reading the kernel in the image (no --kernel).
        self._setup_s: float | None = None
        self._boot_find_s: float | None = None

    # -- statistics --------------------------------------------------------------------------------

    def vm_stats(self) -> dict[str, Any]:
        """The VM's own statistics (stats/vm): exits by reason, devices, milestones."""
        out: dict[str, Any] = {
            "kvm_module": self.flavor.module,
            "pvm_workarounds": self.flavor.is_pvm,
            "memory_bytes": self.config.memory,
            "virtio_notify": self.config.virtio_notify,
            "virtio_irq": self.config.virtio_irq,
        }
        if self.boot_choice is not None:
            out["boot"] = self.boot_choice.stats()
        if self.loop is not None:
            out.update(self.loop.stats())
        if self.serial is not None:
            out["serial"] = self.serial.stats()
        if self.console is not None:
            out["console_milestones_s"] = dict(self.console.milestones)
            out["console_milestone_exits"] = dict(self.console.milestone_counts)
            out["console_milestone_exits_by_kind"] = dict(self.console.milestone_breakdowns)
        if self._setup_s is not None:
            out["setup_s"] = self._setup_s
        if self._boot_find_s is not None:
            out["boot_find_s"] = self._boot_find_s
        if self._run_started:
            out["run_time_s"] = round(time.monotonic() - self._run_started, 3)
        outcome = self.stop.outcome
        out["outcome"] = None if outcome is None else {
            "kind": str(outcome.kind), "reason": outcome.reason, "status": outcome.status}
        return out

    def stats(self) -> dict[str, Any]:
        """Everything, shaped like the FUSE ``stats/`` directory (one key per file)."""
        from vdiskfs.fs.tree import node_stats_entries

        out: dict[str, Any] = {"vm": self.vm_stats()}
        for disk in self.disks:
            entries: dict[str, Any] = {}
            for name, render in node_stats_entries(disk.node):
                text = render().decode()
                entries[name] = text if name == "tree" else json.loads(text)
            if disk.device is not None:
                entries["virtio-blk"] = disk.device.stats()
            out[disk.name] = entries
        return out

    def _exits_total(self) -> int:
        return sum(self.loop.exits.values()) if self.loop is not None else 0

    def _exits_by_kind(self) -> dict[str, int]:
        """Exits by reason, and the port and MMIO accesses among them by device
        (``pio:serial``, ``mmio:<disk>``): what each boot phase spent its exits on."""
        if self.loop is None:
            return {}
        loop = self.loop
        return {**loop.exits, **{f"pio:{k}": v for k, v in loop.pio.accesses.items()},
                **{f"mmio:{k}": v for k, v in loop.mmio.accesses.items()}}

    def extra_stats(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """Stats sources for the FUSE view beside the node files."""
        sources: dict[str, Callable[[], dict[str, Any]]] = {"vm": self.vm_stats}
        for disk in self.disks:
            if disk.device is not None:
                sources[f"{disk.name}/virtio-blk"] = disk.device.stats
        return sources

    # -- setup -------------------------------------------------------------------------------------

    async def _open_disks(self) -> None:
        names = _unique_names([d.path for d in self.config.disks])
        for name, disk in zip(names, self.config.disks, strict=True):
            options = self.config.remote.open_options(read_only=disk.read_only,
                                                      format=disk.format,
                                                      snapshot=disk.snapshot)
            if disk.overlay is not None:
                node = await _open_overlay(disk, options)
            else:
                try:
                    node = await open_image(disk.path, options)
                except (UnsupportedError, ReadOnlyError) as exc:
                    # A format that cannot write, an NBD export the server offers read-only.
                    if disk.read_only:
                        raise
                    raise type(exc)(f"{exc.message} (add readonly=on to boot it read-only, "
                                    "or overlay=NEW.qcow2)", path=exc.path, field=exc.field,
                                    offset=exc.offset, errno=exc.errno) from exc
            if disk.throttle is not None:
                # At the top of the disk's tree, as QEMU's throttle filter.
                node = await throttled(node, self.throttle_groups, disk.throttle, name)
            # (Its warnings were logged as they arose: OpenOptions.tell.)
            self.disks.append(_Disk(name, disk, node))

    async def _find_boot(self) -> None:
        """No --kernel: read what the first disk boots, and say what was chosen (stderr)."""
        if not self.disks:
            raise UnsupportedError("no --kernel and no --disk to find one on")
        disk = self.disks[0]
        # Guest RAM bounds the initrd long before the kernel's initrd_addr_max does.
        choice = self.boot_choice = await find_boot(
            disk.node, redact_url(disk.config.path), initrd_limit=self.config.memory)
        initrd = " + ".join(choice.initrd_names) or "none"
        print(f"vdiskfs boot: booting {choice.reason}:\n  kernel  {choice.kernel_name}\n"
              f"  initrd  {initrd}\n  cmdline {choice.cmdline}", file=sys.stderr)
        for warning in choice.warnings:
            print(f"vdiskfs boot: warning: {warning}", file=sys.stderr)

    def _load_kernel(self, memory: GuestMemory) -> tuple[LoadedKernel, int, int]:
        """The kernel and initrd in guest memory: (kernel, initrd address, initrd size)."""
        config, choice = self.config, self.boot_choice
        if choice is not None:
            kernel = load_kernel_image(memory, choice.kernel, choice.kernel_name)
            choice.kernel = b""  # its ELF is in guest memory now
            if choice.initrd is None:
                return kernel, 0, 0
            address, size = load_initrd_bytes(memory, choice.initrd,
                                              choice.initrd_names[0], kernel)
            choice.initrd = None
            return kernel, address, size
        assert config.kernel is not None
        kernel = load_kernel(memory, config.kernel)
        if config.initrd:
            return kernel, *load_initrd(memory, config.initrd, kernel)
        return kernel, 0, 0

    def _build_cmdline(self, kernel: LoadedKernel) -> Cmdline:
        cmdline = Cmdline(kernel.cmdline_capacity)
        if self.boot_choice is not None:
            cmdline.append(self.boot_choice.cmdline)
        cmdline.append(self.config.append)
        defaults = [
            ("console", "console=ttyS0"),
            # One UART exists: do not make the kernel probe four.
            ("8250.nr_uarts", "8250.nr_uarts=1"),
            # Reset through the i8042, and mark a panic's reboot "warm" (see console.py).
            ("reboot", "reboot=k,panic_warm"),
            ("panic", "panic=-1"),
            # The machine has no PCI bus: do not let the kernel probe config space for one
            # (Firecracker's default too). Kernels with ACPI need CONFIG_PCI all the same.
            ("pci", "pci=off"),
        ]
        for key, arg in defaults:
            if not cmdline.has(key):
                cmdline.append(arg)
        if self.flavor.is_pvm:
            for arg in pvm.CMDLINE_MASKS:
                if not cmdline.has(arg.split("=", 1)[0]):
                    cmdline.append(arg)
        # The ACPI tables describe the disks; this list is for kernels built without ACPI (with
        # CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; they reach only the first VIRTIO_ISA_IRQ_COUNT
        # disks: no IOAPIC without a MADT). A kernel with both finds each window twice; the
        # second platform device of a window fails to claim its memory ("failed to claim
        # resource", drivers/base/platform.c), so each disk still appears once.
        for disk in self.disks:
            cmdline.append(f"virtio_mmio.device=4K@{disk.base:#x}:{disk.irq}")
        return cmdline

    def _setup_machine(self) -> None:
        config = self.config
        kvm = self.kvm = Kvm()
        self.flavor = kvm.flavor
        kvm.require(
            (abi.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
            (abi.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
            (abi.KVM_CAP_PIT2, "KVM_CAP_PIT2"),
            (abi.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
        )
        vm = self.vm = kvm.create_vm()
        memory = self.memory = GuestMemory.anonymous(layout.ram_regions(config.memory))
        vm.map_memory(memory)
        if kvm.check_extension(abi.KVM_CAP_SET_TSS_ADDR):
            vm.set_tss_address(layout.KVM_TSS_ADDRESS)
        if kvm.check_extension(abi.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDRESS)
        vm.create_irqchip()
        vm.create_pit()

        kernel, initrd_addr, initrd_size = self._load_kernel(memory)
        self.kernel = kernel

        pio, mmio = Bus("pio"), Bus("mmio")
        self._setup_console(vm, pio)
        i8042 = I8042(self._on_reset)
        pio.insert(layout.I8042_COMMAND_PORT, 1, "i8042", i8042)
        pio.insert(layout.I8042_DATA_PORT, 1, "i8042-data", I8042(lambda: None))
        pio.insert(layout.CMOS_PORT, layout.CMOS_PORT_COUNT, "cmos", Cmos())
        for index, disk in enumerate(self.disks):
            disk.base, disk.irq = layout.virtio_mmio_window(index)
            self._setup_disk(vm, memory, mmio, disk)

        tables = acpi.build_tables(
            [acpi.MmioDevice(d.base, MMIO_WINDOW_SIZE, d.irq) for d in self.disks], vcpus=1)
        acpi.write_tables(memory, tables)
        log.info("ACPI: RSDP at %#x, %s", tables.rsdp_address,
                 ", ".join(f"{sig} {len(data)} B at {addr:#x}" for sig, addr, data in tables.tables
                           if sig != "RSDP"))

        cmdline = self._build_cmdline(kernel)
        self.cmdline = str(cmdline)
        raw = cmdline.as_bytes()
        memory.write(layout.CMDLINE_START, raw)
        write_boot_params(memory, layout.ZERO_PAGE_START, BootConfig(
            cmdline_addr=layout.CMDLINE_START,
            cmdline_size=len(raw),
            e820=memory_map(layout.ram_regions(config.memory)),
            initrd_addr=initrd_addr,
            initrd_size=initrd_size,
            setup_header=kernel.setup_header,
            acpi_rsdp_addr=tables.rsdp_address,
        ))

        vcpu = self.vcpu = Vcpu(vm, 0, kvm.vcpu_mmap_size())
        regs.setup_cpuid(vcpu, kvm.supported_cpuid())
        regs.setup_msrs(vcpu)
        regs.setup_regs(vcpu, kernel.entry)
        regs.setup_sregs(vcpu, memory)
        regs.setup_fpu(vcpu)
        regs.setup_lapic(vcpu)
        self.loop = VcpuLoop(vcpu, memory, pio, mmio, self.stop, pvm_fixups=self.flavor.is_pvm)
        name = config.kernel if self.boot_choice is None else self.boot_choice.kernel_name
        log.info("kernel %s (%s), entry %#x; command line: %s", name, kernel.kind,
                 kernel.entry, self.cmdline)

    def _setup_console(self, vm: Vm, pio: Bus) -> None:
        if self.config.serial == "stdio":
            self._output_fd = sys.stdout.fileno()
        else:
            self._output_fd = os.open(self.config.serial,
                                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self._close_output = True
        fd = self._output_fd

        def write_out(data: bytes) -> None:
            with contextlib.suppress(OSError):
                os.write(fd, data)

        self.console = ConsoleMonitor(write_out, self.stop, counter=self._exits_total,
                                      breakdown=self._exits_by_kind)
        self.serial = Serial(KvmIrqLine(vm, layout.SERIAL_IRQ), self.console.feed)
        pio.insert(layout.SERIAL_PORT, layout.SERIAL_PORT_COUNT, "serial", self.serial)

    def _setup_disk(self, vm: Vm, memory: GuestMemory, mmio: Bus, disk: _Disk) -> None:
        backend = BlockBackend(disk.node, read_only=disk.config.read_only, serial=disk.name)
        device = disk.device = BlockDevice(backend)
        kick = disk.kick = EventFd()
        if self.config.virtio_notify == "ioeventfd":
            vm.register_ioeventfd(kick.fd, disk.base + QUEUE_NOTIFY_OFFSET, 4, datamatch=0)
        line: InterruptLine
        if self.config.virtio_irq == "irqfd":
            disk.irq_eventfd = EventFd()
            vm.register_irqfd(disk.irq_eventfd.fd, disk.irq)
            line = IrqfdLine(disk.irq_eventfd.fd)
        else:
            line = KvmIrqLine(vm, disk.irq)
        transport = MmioTransport(device, memory, line, [kick])
        mmio.insert(disk.base, MMIO_WINDOW_SIZE, disk.name, transport)

    def _on_reset(self) -> None:
        """The guest pulsed the reset line (vCPU thread): a reboot, or a panic's reboot."""
        assert self.memory is not None and self.console is not None
        warm = self.memory.read_u16(layout.BDA_RESET_FLAG) == 0x1234
        if warm or self.console.panic_reason is not None:
            self.stop.stop(OutcomeKind.PANIC, f"guest panic: {self.console.panic_reason or '?'}")
        else:
            self.stop.stop(OutcomeKind.REBOOT, "guest rebooted")

    # -- running -----------------------------------------------------------------------------------

    async def run(self) -> Outcome:
        """Boot, run until the guest ends (or the run is stopped), tear down; the outcome."""
        started = time.monotonic()
        try:
            await self._open_disks()
            if self.config.kernel is None:
                before = time.monotonic()
                await self._find_boot()
                self._boot_find_s = round(time.monotonic() - before, 3)
            self._setup_machine()
            return await self._run_guest(started)
        finally:
            await self._teardown()

    async def _run_guest(self, started: float) -> Outcome:
        assert self.loop is not None and self.console is not None
        install_kick_handler()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        self.stop.add_listener(wake_trio)
        thread = threading.Thread(target=self.loop.run, name="vcpu0", daemon=True)
        with self._terminal() as interactive:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals)
                for disk in self.disks:
                    assert disk.device is not None and disk.kick is not None
                    nursery.start_soon(disk.device.serve, [disk.kick])
                if interactive is not None:
                    nursery.start_soon(self._pump_stdin, interactive)
                if self.config.mountpoint is not None:
                    await self._start_mount(nursery)
                self._run_started = time.monotonic()
                self._setup_s = round(self._run_started - started, 3)
                self.console.restart_clock()
                thread.start()
                try:
                    await done.wait()
                finally:
                    if not self.stop.is_set():
                        self.stop.stop(OutcomeKind.INTERRUPTED, "VMM cancelled")
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(thread.join)
                    nursery.cancel_scope.cancel()
        outcome = self.stop.outcome
        assert outcome is not None
        return outcome

    async def _start_mount(self, nursery: trio.Nursery) -> None:
        from vdiskfs.fs import Export, VdiskOperations, serve

        exports = [Export(name=d.name, node=d.node, writable=False, direct_io=True)
                   for d in self.disks]
        operations = VdiskOperations(exports, extra_stats=self.extra_stats())
        assert self.config.mountpoint is not None
        # A throttled disk's limits change through its control file: not a "ro" mount then
        # (the disks are read-only files all the same).
        throttled_disks = any(d.config.throttle is not None for d in self.disks)
        await nursery.start(lambda task_status: serve(
            operations, self.config.mountpoint, read_only=not throttled_disks,
            task_status=task_status))

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                self.stop.stop(OutcomeKind.INTERRUPTED,
                               f"stopped by {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def _terminal(self) -> Iterator[int | None]:
        """Raw mode on an interactive console (restored after); yields the input fd or None."""
        if self.config.serial != "stdio":
            yield None
            return
        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            yield None
            return
        saved = termios.tcgetattr(fd)
        try:
            tty.setraw(fd)
            yield fd
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    def _write_stats_file(self) -> None:
        if self.config.stats_file is None or self.loop is None:
            return
        try:
            with open(self.config.stats_file, "w") as f:
                json.dump(self.stats(), f, indent=2)
                f.write("\n")
        except OSError as exc:
            log.error("cannot write stats to %s: %s", self.config.stats_file, exc)

    async def _pump_stdin(self, fd: int) -> None:
        """Keyboard input to the UART; Ctrl-A x quits, Ctrl-A Ctrl-A sends a Ctrl-A."""
        assert self.serial is not None
        os.set_blocking(fd, False)
        escape = False
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, 256)
                except BlockingIOError:
                    continue
                if not data:
                    return
                pending = bytearray()
                for byte in data:
                    if escape:
                        escape = False
                        if byte == ESCAPE_QUIT:
                            self.stop.stop(OutcomeKind.INTERRUPTED, "quit from the console")
                            return
                        pending.append(byte)
                    elif byte == ESCAPE_BYTE:
                        escape = True
                    else:
                        pending.append(byte)
                while pending:
                    taken = self.serial.enqueue_input(bytes(pending))
                    del pending[:taken]
                    if pending:
                        await trio.sleep(0.01)
        finally:
            os.set_blocking(fd, True)

    async def _teardown(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                for disk in self.disks:
                    try:
                        if not disk.node.read_only:
                            await disk.node.flush()
                    except VdiskError as exc:
                        log.error("%s: flush failed: %s", disk.name, exc)
                # After the final flush, so that the figures include its write-back; before
                # the close, which drops the nodes' state.
                self._write_stats_file()
            finally:
                for disk in self.disks:
                    await disk.node.aclose()
        for disk in self.disks:
            for efd in (disk.kick, disk.irq_eventfd):
                if efd is not None:
                    efd.close()
        if self.vcpu is not None:
            self.vcpu.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        if self.memory is not None:
            with contextlib.suppress(BufferError):
                self.memory.close()
        if self._close_output:
            os.close(self._output_fd)
