"""A vCPU: its file descriptor and ``kvm_run`` page (:class:`Vcpu`), and the loop that runs it
in its own thread and serves its exits (:class:`VcpuLoop`).

The loop blocks in ``KVM_RUN``; port I/O and MMIO exits go to the buses (device register
accesses are quick and synchronous: serial, i8042, virtio-mmio registers); the block I/O itself
never runs here -- a queue notification is handed to the trio loop through an eventfd. Other
threads end the run with :meth:`Vcpu.kick` (``immediate_exit`` plus a signal, so a vCPU halted
in the kernel comes back too).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import threading
from collections import Counter
from typing import Any

from emulator.devices.bus import Bus
from emulator.kvm import abi, ioctls, pvm
from emulator.kvm.vcpu_protocol import VcpuProtocol
from emulator.kvm.vm import Vm, ioctl
from emulator.memory import GuestMemory
from emulator.outcome import OutcomeKind, StopSignal

__all__ = ["KICK_SIGNAL", "Vcpu", "VcpuLoop", "install_kick_handler"]

log = logging.getLogger(__name__)

#: Signal that interrupts KVM_RUN in the vCPU thread (its handler does nothing).
KICK_SIGNAL = signal.SIGRTMIN


def install_kick_handler() -> None:
    """Install a no-op handler for :data:`KICK_SIGNAL` (main thread only): a handled signal
    makes ``KVM_RUN`` return ``EINTR`` instead of killing the process."""
    signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


class Vcpu:
    """One vCPU file descriptor; register groups in and out as ctypes structures."""

    def __init__(self, vm: Vm, index: int, mmap_size: int) -> None:
        self.index = index
        self.fd = vm.create_vcpu_fd(index)
        self._run_map = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        #: The shared ``kvm_run`` page: exit reason and data.
        self.run_page = memoryview(self._run_map)
        self.state = abi.KvmRun.from_buffer(self._run_map)
        self.thread_id: int | None = None

    def close(self) -> None:
        del self.state
        self.run_page.release()
        self._run_map.close()
        os.close(self.fd)

    def run(self) -> int:
        """One ``KVM_RUN``; the exit reason (``KVM_EXIT_INTR`` when a signal interrupted it)."""
        try:
            ioctl(self.fd, ioctls.KVM_RUN)
        except InterruptedError:
            self.state.immediate_exit = 0
            return abi.KVM_EXIT_INTR
        reason: int = self.state.exit_reason  # a ctypes field: untyped
        return reason

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN soon (any thread)."""
        self.state.immediate_exit = 1
        if self.thread_id is not None:
            signal.pthread_kill(self.thread_id, KICK_SIGNAL)

    # -- register groups ----------------------------------------------------------------------

    def get_regs(self) -> abi.KvmRegs:
        regs = abi.KvmRegs()
        ioctl(self.fd, ioctls.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.KvmRegs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.KvmSregs:
        sregs = abi.KvmSregs()
        ioctl(self.fd, ioctls.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.KvmFpu:
        fpu = abi.KvmFpu()
        ioctl(self.fd, ioctls.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.KvmFpu) -> None:
        ioctl(self.fd, ioctls.KVM_SET_FPU, fpu)

    def get_lapic(self) -> abi.KvmLapicState:
        lapic = abi.KvmLapicState()
        ioctl(self.fd, ioctls.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: abi.KvmLapicState) -> None:
        ioctl(self.fd, ioctls.KVM_SET_LAPIC, lapic)

    def set_cpuid(self, cpuid: abi.KvmCpuid2) -> None:
        ioctl(self.fd, ioctls.KVM_SET_CPUID2, cpuid)

    def set_msrs(self, entries: list[tuple[int, int]]) -> int:
        msrs = abi.KvmMsrs(nmsrs=len(entries))
        for i, (index, value) in enumerate(entries):
            msrs.entries[i].index = index
            msrs.entries[i].data = value
        return ioctl(self.fd, ioctls.KVM_SET_MSRS, msrs)

    def get_msr(self, index: int) -> int:
        msrs = abi.KvmMsrs(nmsrs=1)
        msrs.entries[0].index = index
        if ioctl(self.fd, ioctls.KVM_GET_MSRS, msrs) != 1:
            raise OSError(f"cannot read MSR {index:#x}")
        value: int = msrs.entries[0].data  # a ctypes field: untyped
        return value

    def set_guest_debug(self, control: int, breakpoints: tuple[int, ...] = ()) -> None:
        """Debug exits: ``control`` is KVM_GUESTDBG_* flags; ``breakpoints`` are instruction
        addresses for DR0-DR3 (global enable, execute, length 1)."""
        debug = abi.KvmGuestDebug(control=control)
        dr7 = 0x400  # bit 10 is always set
        for i, address in enumerate(breakpoints[:4]):
            debug.debugreg[i] = address
            dr7 |= 2 << (2 * i)  # Gn: global enable; R/Wn = LENn = 0: instruction breakpoint
        debug.debugreg[7] = dr7
        ioctl(self.fd, ioctls.KVM_SET_GUEST_DEBUG, debug)

    def get_events(self) -> abi.KvmVcpuEvents:
        events = abi.KvmVcpuEvents()
        ioctl(self.fd, ioctls.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_events(self, events: abi.KvmVcpuEvents) -> None:
        ioctl(self.fd, ioctls.KVM_SET_VCPU_EVENTS, events)

    def translate(self, linear: int) -> int | None:
        """Guest-physical address of a guest-virtual one, through the guest's page tables."""
        tr = abi.KvmTranslation(linear_address=linear)
        try:
            ioctl(self.fd, ioctls.KVM_TRANSLATE, tr)
        except OSError:
            return None
        return tr.physical_address if tr.valid else None


class VcpuLoop:
    """Runs one vCPU until the :class:`StopSignal` is set; counts every exit."""

    def __init__(
        self,
        vcpu: VcpuProtocol,
        memory: GuestMemory,
        pio: Bus,
        mmio: Bus,
        stop: StopSignal,
        *,
        pvm_fixups: bool,
    ) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.stop = stop
        self.pvm_fixups = pvm_fixups
        #: VM exits by reason name.
        self.exits: Counter[str] = Counter()
        #: Instructions completed for the emulated KVM, by name.
        self.fixups: Counter[str] = Counter()
        #: Completes user-mode system calls where PVM leaves them half done.
        self.syscalls = pvm.SyscallCompleter(vcpu, memory) if pvm_fixups else None
        stop.add_listener(vcpu.kick)

    def stats(self) -> dict[str, Any]:
        """Snapshot of the exit counters (for stats/vm and the JSON stats)."""
        return {
            "exits_total": sum(self.exits.values()),
            "exits": dict(self.exits),
            "pio_by_device": dict(self.pio.accesses),
            "mmio_by_device": dict(self.mmio.accesses),
            "unclaimed_pio_ports": {f"{k:#x}": v for k, v in self.pio.unclaimed.items()},
            "unclaimed_mmio": {f"{k:#x}": v for k, v in self.mmio.unclaimed.items()},
            "emulation_fixups": dict(self.fixups),
            **({"pvm_" + k: v for k, v in self.syscalls.stats().items()}
               if self.syscalls is not None else {}),
        }

    def run(self) -> None:
        """The vCPU thread's body. Never raises: a VMM bug ends the run as an outcome."""
        self.vcpu.thread_id = threading.get_ident()
        try:
            if self.stop.is_set():
                return
            self._loop()
        except Exception as exc:
            log.exception("vCPU thread failed")
            self.stop.stop(OutcomeKind.VMM_ERROR, f"vCPU thread: {type(exc).__name__}: {exc}")
        finally:
            self.vcpu.thread_id = None

    def _loop(self) -> None:
        vcpu, state, page = self.vcpu, self.vcpu.state, self.vcpu.run_page
        exits, names = self.exits, abi.EXIT_REASON_NAMES
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        stop = self.stop
        poll = self.syscalls.poll if self.syscalls is not None else None
        while not stop.is_set():
            reason = vcpu.run()
            exits[names.get(reason, str(reason))] += 1
            if poll is not None:
                poll()
            if reason == abi.KVM_EXIT_IO:
                io = state.exit.io
                size, port, offset = io.size, io.port, io.data_offset
                if io.direction == abi.KVM_EXIT_IO_OUT:
                    for _ in range(io.count):
                        pio_write(port, bytes(page[offset : offset + size]))
                        offset += size
                else:
                    for _ in range(io.count):
                        page[offset : offset + size] = pio_read(port, size)
                        offset += size
            elif reason == abi.KVM_EXIT_MMIO:
                mmio = state.exit.mmio
                length = mmio.len
                if mmio.is_write:
                    mmio_write(mmio.phys_addr, bytes(mmio.data)[:length])
                else:
                    data = mmio_read(mmio.phys_addr, length)
                    ctypes.memmove(mmio.data, data, length)
            elif reason == abi.KVM_EXIT_INTR:
                continue
            else:
                self._other_exit(reason)

    def _other_exit(self, reason: int) -> None:
        state, stop = self.vcpu.state, self.stop
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            self._internal_error()
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            stop.stop(OutcomeKind.TRIPLE_FAULT, f"triple fault {self.describe_rip()}")
        elif reason == abi.KVM_EXIT_DEBUG and self.syscalls is not None:
            self.syscalls.on_debug_exit()
        elif reason == abi.KVM_EXIT_HLT:
            stop.stop(OutcomeKind.POWEROFF, "the vCPU halted")
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = state.exit.system_event.type
            if kind == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
                stop.stop(OutcomeKind.POWEROFF, "guest shut down")
            elif kind == abi.KVM_SYSTEM_EVENT_RESET:
                stop.stop(OutcomeKind.REBOOT, "guest reset")
            else:
                stop.stop(OutcomeKind.PANIC, f"guest crash event {kind}")
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            code = state.exit.fail_entry.hardware_entry_failure_reason
            stop.stop(OutcomeKind.VMM_ERROR, f"VM entry failed (reason {code:#x})")
        else:
            name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
            stop.stop(OutcomeKind.VMM_ERROR, f"unexpected VM exit {name} "
                      f"{self.describe_rip()}")

    # -- emulation failures -----------------------------------------------------------------------

    def instruction_bytes(self) -> bytes:
        """The bytes at the guest's RIP: from the exit data when KVM gave them, else read
        through the guest's page tables."""
        failure = self.vcpu.state.exit.emulation_failure
        if (failure.ndata >= 3
                and failure.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
            return bytes(failure.insn_bytes[: min(failure.insn_size, 15)])
        rip = self.vcpu.get_regs().rip
        gpa = self.vcpu.translate(rip)
        if gpa is None:
            return b""
        length = min(15, 0x1000 - (gpa & 0xFFF))
        return self.memory.read(gpa, length) if self.memory.contains(gpa, length) else b""

    def describe_rip(self) -> str:
        """``at RIP=... (bytes ...)`` for the one-line reasons."""
        try:
            rip = self.vcpu.get_regs().rip
        except OSError:
            return "(registers unavailable)"
        gpa = self.vcpu.translate(rip)
        code = b""
        if gpa is not None and self.memory.contains(gpa, 1):
            length = min(15, 0x1000 - (gpa & 0xFFF))
            if self.memory.contains(gpa, length):
                code = self.memory.read(gpa, length)
        return f"at RIP={rip:#x} (bytes {code.hex(' ') or 'unreadable'})"

    def _internal_error(self) -> None:
        internal = self.vcpu.state.exit.internal
        if internal.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
            data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
            self.stop.stop(
                OutcomeKind.VMM_ERROR,
                f"KVM internal error {internal.suberror} (data {data or 'none'}) "
                f"{self.describe_rip()}",
            )
            return
        code = self.instruction_bytes()
        fixup = pvm.classify(code) if self.pvm_fixups else None
        if fixup is None and self.pvm_fixups:
            completed = pvm.complete_mxcsr(self.vcpu, self.memory, code)
            if completed is not None:
                self.fixups[completed] += 1
                return
        if fixup is None:
            rip = self.vcpu.get_regs().rip
            self.stop.stop(
                OutcomeKind.EMULATION_FAILURE,
                f"instruction the host cannot run at RIP={rip:#x} "
                f"(bytes {code.hex(' ') or 'unreadable'})",
            )
            return
        self.fixups[fixup.name] += 1
        regs = self.vcpu.get_regs()
        regs.rip += fixup.length
        self.vcpu.set_regs(regs)
        if fixup.inject is not None:
            events = self.vcpu.get_events()
            events.exception.injected = 1
            events.exception.nr = fixup.inject
            events.exception.has_error_code = 0
            events.exception.error_code = 0
            self.vcpu.set_events(events)
