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
from collections.abc import AsyncIterator, Callable, Iterator
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

__all__ = ["DiskConfig", "VmConfig", "Vmm", "build_vmm", "run_vmm"]

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


@dataclass(frozen=True)
class _Disk:
    """A disk as the VM has it: its node, its virtio-blk device and the eventfds wiring them."""

    name: str
    config: DiskConfig
    node: BlockNode
    device: BlockDevice
    #: Queue notifications (written by KVM's ioeventfd or the vCPU thread).
    kick: EventFd
    #: The irqfd that raises the disk's interrupt; None with ``virtio_irq="ioctl"``.
    irq_eventfd: EventFd | None
    base: int
    irq: int


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


async def _open_disks(config: VmConfig, throttle_groups: ThrottleGroups,
                      stack: contextlib.AsyncExitStack) -> list[tuple[str, DiskConfig, BlockNode]]:
    """Every ``--disk``'s node tree, each closed by ``stack``."""
    opened: list[tuple[str, DiskConfig, BlockNode]] = []
    names = _unique_names([d.path for d in config.disks])
    for name, disk in zip(names, config.disks, strict=True):
        options = config.remote.open_options(read_only=disk.read_only, format=disk.format,
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
        stack.push_async_callback(_close_node, node)
        if disk.throttle is not None:
            # At the top of the disk's tree, as QEMU's throttle filter. (The filter closes the
            # tree under it; that tree's own callback then finds it closed: aclose is
            # idempotent.)
            node = await throttled(node, throttle_groups, disk.throttle, name)
            stack.push_async_callback(_close_node, node)
        # (Its warnings were logged as they arose: OpenOptions.tell.)
        opened.append((name, disk, node))
    return opened


async def _close_node(node: BlockNode) -> None:
    # Shielded: a cancelled run (Ctrl-C) still closes every node, and closing writes back
    # what the node holds.
    with trio.CancelScope(shield=True):
        await node.aclose()


def _close_memory(memory: GuestMemory) -> None:
    # A view of guest memory still alive somewhere keeps the mapping: it goes with the process.
    with contextlib.suppress(BufferError):
        memory.close()


async def _find_boot(config: VmConfig, disks: list[tuple[str, DiskConfig, BlockNode]]
                     ) -> BootChoice:
    """No --kernel: read what the first disk boots, and say what was chosen (stderr)."""
    if not disks:
        raise UnsupportedError("no --kernel and no --disk to find one on")
    _, disk, node = disks[0]
    # Guest RAM bounds the initrd long before the kernel's initrd_addr_max does.
    choice = await find_boot(node, redact_url(disk.path), initrd_limit=config.memory)
    initrd = " + ".join(choice.initrd_names) or "none"
    print(f"vdiskfs boot: booting {choice.reason}:\n  kernel  {choice.kernel_name}\n"
          f"  initrd  {initrd}\n  cmdline {choice.cmdline}", file=sys.stderr)
    for warning in choice.warnings:
        print(f"vdiskfs boot: warning: {warning}", file=sys.stderr)
    return choice


def _load_kernel(config: VmConfig, choice: BootChoice | None,
                 memory: GuestMemory) -> tuple[LoadedKernel, int, int]:
    """The kernel and initrd in guest memory: (kernel, initrd address, initrd size)."""
    if choice is not None:
        kernel = load_kernel_image(memory, choice.kernel, choice.kernel_name)
        choice.kernel = b""  # its ELF is in guest memory now
        if choice.initrd is None:
            return kernel, 0, 0
        address, size = load_initrd_bytes(memory, choice.initrd, choice.initrd_names[0], kernel)
        choice.initrd = None
        return kernel, address, size
    assert config.kernel is not None  # no choice is made only when --kernel is given
    kernel = load_kernel(memory, config.kernel)
    if config.initrd:
        return kernel, *load_initrd(memory, config.initrd, kernel)
    return kernel, 0, 0


def _build_cmdline(config: VmConfig, choice: BootChoice | None, kernel: LoadedKernel,
                   flavor: KvmFlavor, windows: list[tuple[int, int]]) -> Cmdline:
    cmdline = Cmdline(kernel.cmdline_capacity)
    if choice is not None:
        cmdline.append(choice.cmdline)
    cmdline.append(config.append)
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
    if flavor.is_pvm:
        for arg in (*pvm.CMDLINE_MASKS, *pvm.CMDLINE_SPEED):
            if not cmdline.has(arg.split("=", 1)[0]):
                cmdline.append(arg)
    # The ACPI tables describe the disks; this list is for kernels built without ACPI (with
    # CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; they reach only the first VIRTIO_ISA_IRQ_COUNT
    # disks: no IOAPIC without a MADT). A kernel with both finds each window twice; the
    # second platform device of a window fails to claim its memory ("failed to claim
    # resource", drivers/base/platform.c), so each disk still appears once.
    for base, irq in windows:
        cmdline.append(f"virtio_mmio.device=4K@{base:#x}:{irq}")
    return cmdline


def _open_console_output(serial: str, stack: contextlib.AsyncExitStack) -> int:
    """The file descriptor the console writes to: stdout, or the ``--serial`` file."""
    if serial == "stdio":
        return sys.stdout.fileno()
    fd = os.open(serial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    stack.callback(os.close, fd)
    return fd


def _reset_handler(memory: GuestMemory, console: ConsoleMonitor,
                   stop: StopSignal) -> Callable[[], None]:
    def on_reset() -> None:
        """The guest pulsed the reset line (vCPU thread): a reboot, or a panic's reboot."""
        warm = memory.read_u16(layout.BDA_RESET_FLAG) == 0x1234
        if warm or console.panic_reason is not None:
            stop.stop(OutcomeKind.PANIC, f"guest panic: {console.panic_reason or '?'}")
        else:
            stop.stop(OutcomeKind.REBOOT, "guest rebooted")

    return on_reset


def _setup_disk(config: VmConfig, vm: Vm, memory: GuestMemory, mmio: Bus, index: int,
                opened: tuple[str, DiskConfig, BlockNode],
                stack: contextlib.AsyncExitStack) -> _Disk:
    name, disk_config, node = opened
    base, irq = layout.virtio_mmio_window(index)
    backend = BlockBackend(node, read_only=disk_config.read_only, serial=name)
    device = BlockDevice(backend)
    kick = stack.enter_context(contextlib.closing(EventFd()))
    if config.virtio_notify == "ioeventfd":
        vm.register_ioeventfd(kick.fd, base + QUEUE_NOTIFY_OFFSET, 4, datamatch=0)
    line: InterruptLine
    irq_eventfd: EventFd | None = None
    if config.virtio_irq == "irqfd":
        irq_eventfd = stack.enter_context(contextlib.closing(EventFd()))
        vm.register_irqfd(irq_eventfd.fd, irq)
        line = IrqfdLine(irq_eventfd.fd)
    else:
        line = KvmIrqLine(vm, irq)
    transport = MmioTransport(device, memory, line, [kick])
    mmio.insert(base, MMIO_WINDOW_SIZE, name, transport)
    return _Disk(name, disk_config, node, device, kick, irq_eventfd, base, irq)


@contextlib.asynccontextmanager
async def build_vmm(config: VmConfig) -> AsyncIterator[Vmm]:
    """The VM of ``config`` built whole -- disks open, KVM set up, devices wired, kernel and
    boot parameters in guest memory -- as Firecracker's builder hands back a finished ``Vmm``.

    Leaving the block tears it all down in the reverse order of building, after the disks'
    final flush and the ``--stats`` file. A step that fails undoes the steps before it.
    """
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        stop = StopSignal()
        # The VM's throttle groups: disks share a budget only when they name one.
        throttle_groups = ThrottleGroups()
        opened = await _open_disks(config, throttle_groups, stack)
        choice: BootChoice | None = None
        boot_find_s: float | None = None
        if config.kernel is None:
            before = time.monotonic()
            choice = await _find_boot(config, opened)
            boot_find_s = round(time.monotonic() - before, 3)
        # Closed last of the machine: the VM and the vCPU map it until they are closed.
        memory = GuestMemory.anonymous(layout.ram_regions(config.memory))
        stack.callback(_close_memory, memory)
        kvm = stack.enter_context(contextlib.closing(Kvm()))
        kvm.require(
            (abi.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
            (abi.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
            (abi.KVM_CAP_PIT2, "KVM_CAP_PIT2"),
            (abi.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
        )
        vm = stack.enter_context(contextlib.closing(kvm.create_vm()))
        vm.map_memory(memory)
        if kvm.check_extension(abi.KVM_CAP_SET_TSS_ADDR):
            vm.set_tss_address(layout.KVM_TSS_ADDRESS)
        if kvm.check_extension(abi.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDRESS)
        vm.create_irqchip()
        vm.create_pit()

        kernel, initrd_addr, initrd_size = _load_kernel(config, choice, memory)

        pio, mmio = Bus("pio"), Bus("mmio")
        output_fd = _open_console_output(config.serial, stack)

        def write_out(data: bytes) -> None:
            with contextlib.suppress(OSError):
                os.write(output_fd, data)

        # The console reads the exits at each milestone: the loop is made below, before the
        # vCPU runs and prints anything.
        console = ConsoleMonitor(write_out, stop, counter=lambda: sum(loop.exits.values()),
                                 breakdown=lambda: _exits_by_kind(loop))
        serial = Serial(KvmIrqLine(vm, layout.SERIAL_IRQ), console.feed)
        pio.insert(layout.SERIAL_PORT, layout.SERIAL_PORT_COUNT, "serial", serial)
        pio.insert(layout.I8042_COMMAND_PORT, 1, "i8042",
                   I8042(_reset_handler(memory, console, stop)))
        pio.insert(layout.I8042_DATA_PORT, 1, "i8042-data", I8042(lambda: None))
        pio.insert(layout.CMOS_PORT, layout.CMOS_PORT_COUNT, "cmos", Cmos())
        disks = [_setup_disk(config, vm, memory, mmio, index, disk, stack)
                 for index, disk in enumerate(opened)]

        tables = acpi.build_tables(
            [acpi.MmioDevice(d.base, MMIO_WINDOW_SIZE, d.irq) for d in disks], vcpus=1)
        acpi.write_tables(memory, tables)
        log.info("ACPI: RSDP at %#x, %s", tables.rsdp_address,
                 ", ".join(f"{sig} {len(data)} B at {addr:#x}" for sig, addr, data in tables.tables
                           if sig != "RSDP"))

        flavor = kvm.flavor
        cmdline = _build_cmdline(config, choice, kernel, flavor, [(d.base, d.irq) for d in disks])
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

        vcpu = stack.enter_context(contextlib.closing(Vcpu(vm, 0, kvm.vcpu_mmap_size())))
        regs.setup_cpuid(vcpu, kvm.supported_cpuid())
        regs.setup_msrs(vcpu)
        regs.setup_regs(vcpu, kernel.entry)
        regs.setup_sregs(vcpu, memory)
        regs.setup_fpu(vcpu)
        regs.setup_lapic(vcpu)
        loop = VcpuLoop(vcpu, memory, pio, mmio, stop, pvm_fixups=flavor.is_pvm)
        name = config.kernel if choice is None else choice.kernel_name
        log.info("kernel %s (%s), entry %#x; command line: %s", name, kernel.kind,
                 kernel.entry, cmdline)

        vmm = Vmm(config=config, stop=stop, disks=disks, flavor=flavor, loop=loop, serial=serial,
                  console=console, boot_choice=choice, started=started, boot_find_s=boot_find_s)
        # Runs first on the way out: flush, then the figures, while the nodes are open.
        stack.push_async_callback(vmm.finish)
        yield vmm


def _exits_by_kind(loop: VcpuLoop) -> dict[str, int]:
    """Exits by reason, and the port and MMIO accesses among them by device (``pio:serial``,
    ``mmio:<disk>``): what each boot phase spent its exits on."""
    return {**loop.exits, **{f"pio:{k}": v for k, v in loop.pio.accesses.items()},
            **{f"mmio:{k}": v for k, v in loop.mmio.accesses.items()}}


async def run_vmm(config: VmConfig) -> Outcome:
    """Build the VM of ``config``, run it until the guest ends, tear it down; the outcome."""
    async with build_vmm(config) as vmm:
        return await vmm.run()


class Vmm:
    """One VM, built whole by :func:`build_vmm`: :meth:`run` runs it once."""

    def __init__(self, *, config: VmConfig, stop: StopSignal, disks: list[_Disk],
                 flavor: KvmFlavor, loop: VcpuLoop, serial: Serial, console: ConsoleMonitor,
                 boot_choice: BootChoice | None, started: float,
                 boot_find_s: float | None) -> None:
        self.config = config
        self.stop = stop
        self.disks = disks
        self.flavor = flavor
        self.loop = loop
        self.serial = serial
        self.console = console
        #: What was found on the disk when no --kernel was given.
        self.boot_choice = boot_choice
        #: When building began (time.monotonic()), and the seconds that finding and reading
        #: the kernel in the image took of it (no --kernel).
        self._started = started
        self._boot_find_s = boot_find_s
        #: When the vCPU started (time.monotonic()); 0 before the run.
        self._run_started = 0.0

    # -- statistics --------------------------------------------------------------------------------

    def vm_stats(self) -> dict[str, Any]:
        """The VM's own statistics (stats/vm): exits by reason, devices, milestones."""
        out: dict[str, Any] = {
            "kvm_module": self.flavor.module,
            "pvm_workarounds": self.flavor.is_pvm,
            "memory_bytes": self.config.memory,
            "virtio_notify": self.config.virtio_notify,
            "virtio_irq": self.config.virtio_irq,
            **({"boot": self.boot_choice.stats()} if self.boot_choice is not None else {}),
            **self.loop.stats(),
            "serial": self.serial.stats(),
            "console_milestones_s": dict(self.console.milestones),
            "console_milestone_exits": dict(self.console.milestone_counts),
            "console_milestone_exits_by_kind": dict(self.console.milestone_breakdowns),
        }
        if self._run_started:
            # Seconds from the start of building to the vCPU's start (disks opened, kernel
            # found and loaded), and of those, finding and reading the kernel (no --kernel).
            out["setup_s"] = round(self._run_started - self._started, 3)
        if self._boot_find_s is not None:
            out["boot_find_s"] = self._boot_find_s
        if self._run_started:
            out["run_time_s"] = round(time.monotonic() - self._run_started, 3)
        outcome = self.stop.outcome
        out["outcome"] = None if outcome is None else {
            "kind": str(outcome.kind), "reason": outcome.reason, "status": outcome.status}
        return out

    def stats(self) -> dict[str, Any]:
        """Everything, shaped like the FUSE ``stats/`` directory (one key per file), as plain
        values: the caller renders it (``--stats`` writes it as one JSON document)."""
        # Lazy: the FUSE layer's tree module, only for the function that walks a node tree.
        from vdiskfs.fs.tree import node_stats_sources

        out: dict[str, Any] = {"vm": self.vm_stats()}
        for disk in self.disks:
            tree, nodes = node_stats_sources(disk.node)
            entries: dict[str, Any] = {"tree": tree()}
            entries.update((name, source()) for name, source in nodes)
            entries["virtio-blk"] = disk.device.stats()
            out[disk.name] = entries
        return out

    def extra_stats(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """Stats sources for the FUSE view beside the node files."""
        sources: dict[str, Callable[[], dict[str, Any]]] = {"vm": self.vm_stats}
        for disk in self.disks:
            sources[f"{disk.name}/virtio-blk"] = disk.device.stats
        return sources

    def _write_stats_file(self) -> None:
        if self.config.stats_file is None:
            return
        try:
            with open(self.config.stats_file, "w") as f:
                json.dump(self.stats(), f, indent=2)
                f.write("\n")
        except OSError as exc:
            log.error("cannot write stats to %s: %s", self.config.stats_file, exc)

    async def finish(self) -> None:
        """The disks' final flush, then the ``--stats`` file (so that its figures include the
        flush's write-back); :func:`build_vmm` calls it before it closes anything."""
        with trio.CancelScope(shield=True):
            for disk in self.disks:
                try:
                    if not disk.node.read_only:
                        await disk.node.flush()
                except VdiskError as exc:
                    log.error("%s: flush failed: %s", disk.name, exc)
        self._write_stats_file()

    # -- running -----------------------------------------------------------------------------------

    async def run(self) -> Outcome:
        """Run the guest until it ends (or the run is stopped); the outcome."""
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
                    nursery.start_soon(disk.device.serve, [disk.kick])
                if interactive is not None:
                    nursery.start_soon(self._pump_stdin, interactive)
                if self.config.mountpoint is not None:
                    await self._start_mount(nursery, self.config.mountpoint)
                self._run_started = time.monotonic()
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
        assert outcome is not None  # set by whatever ended the run, or just above
        return outcome

    async def _start_mount(self, nursery: trio.Nursery, mountpoint: str) -> None:
        from vdiskfs.fs import Export, VdiskOperations, serve

        exports = [Export(name=d.name, node=d.node, writable=False, direct_io=True)
                   for d in self.disks]
        operations = VdiskOperations(exports, extra_stats=self.extra_stats())
        # A throttled disk's limits change through its control file: not a "ro" mount then
        # (the disks are read-only files all the same).
        throttled_disks = any(d.config.throttle is not None for d in self.disks)
        await nursery.start(lambda task_status: serve(
            operations, mountpoint, read_only=not throttled_disks,
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

    async def _pump_stdin(self, fd: int) -> None:
        """Keyboard input to the UART; Ctrl-A x quits, Ctrl-A Ctrl-A sends a Ctrl-A."""
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
