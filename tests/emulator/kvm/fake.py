"""A vCPU without KVM: a ``kvm_run`` page in plain memory and scripted exits, so the exit
handling of :class:`~emulator.kvm.vcpu.VcpuLoop` can be tested anywhere."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from emulator.kvm import abi

RUN_PAGE_SIZE = 4096
#: Where the fake puts port-I/O data in the page (KVM uses an offset past struct kvm_run).
IO_DATA_OFFSET = 0x800


class FakeVcpu:
    def __init__(self) -> None:
        self._page = bytearray(RUN_PAGE_SIZE)
        self.run_page = memoryview(self._page)
        self.state = abi.KvmRun.from_buffer(self._page)
        self.regs = abi.KvmRegs()
        self.sregs = abi.KvmSregs()
        self.fpu = abi.KvmFpu(mxcsr=0x1F80)
        self.events: list[abi.KvmVcpuEvents] = []
        self.msrs: dict[int, int] = {}
        self.debug: list[tuple[int, tuple[int, ...]]] = []
        #: Guest-virtual -> guest-physical, for translate().
        self.page_table: dict[int, int] = {}
        self.script: list[Callable[[FakeVcpu], int]] = []
        self.kicks = 0
        self.thread_id: int | None = None

    # What the loop calls.
    def run(self) -> int:
        if not self.script:
            raise AssertionError("the loop ran past the script")
        return self.script.pop(0)(self)

    def kick(self) -> None:
        self.kicks += 1

    def get_regs(self) -> abi.KvmRegs:
        return abi.KvmRegs.from_buffer_copy(self.regs)

    def set_regs(self, regs: abi.KvmRegs) -> None:
        ctypes.memmove(ctypes.addressof(self.regs), ctypes.addressof(regs),
                       ctypes.sizeof(regs))

    def get_sregs(self) -> abi.KvmSregs:
        return abi.KvmSregs.from_buffer_copy(self.sregs)

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        ctypes.memmove(ctypes.addressof(self.sregs), ctypes.addressof(sregs),
                       ctypes.sizeof(sregs))

    def get_fpu(self) -> abi.KvmFpu:
        return abi.KvmFpu.from_buffer_copy(self.fpu)

    def set_fpu(self, fpu: abi.KvmFpu) -> None:
        self.fpu = abi.KvmFpu.from_buffer_copy(fpu)

    def get_events(self) -> abi.KvmVcpuEvents:
        return abi.KvmVcpuEvents()

    def set_events(self, events: abi.KvmVcpuEvents) -> None:
        self.events.append(events)

    def get_msr(self, index: int) -> int:
        return self.msrs[index]

    def set_guest_debug(self, control: int, breakpoints: tuple[int, ...] = ()) -> None:
        self.debug.append((control, breakpoints))

    def translate(self, linear: int) -> int | None:
        page = self.page_table.get(linear & ~0xFFF)
        return None if page is None else page | (linear & 0xFFF)


# -- scripted exits ----------------------------------------------------------------------------


def io_out(port: int, data: bytes) -> Callable[[FakeVcpu], int]:
    def step(vcpu: FakeVcpu) -> int:
        io = vcpu.state.exit.io
        io.direction, io.size, io.port, io.count = abi.KVM_EXIT_IO_OUT, len(data), port, 1
        io.data_offset = IO_DATA_OFFSET
        vcpu.run_page[IO_DATA_OFFSET : IO_DATA_OFFSET + len(data)] = data
        return abi.KVM_EXIT_IO

    return step


def io_in(port: int, size: int) -> Callable[[FakeVcpu], int]:
    def step(vcpu: FakeVcpu) -> int:
        io = vcpu.state.exit.io
        io.direction, io.size, io.port, io.count = abi.KVM_EXIT_IO_IN, size, port, 1
        io.data_offset = IO_DATA_OFFSET
        return abi.KVM_EXIT_IO

    return step


def mmio(address: int, data: bytes, *, write: bool) -> Callable[[FakeVcpu], int]:
    def step(vcpu: FakeVcpu) -> int:
        m = vcpu.state.exit.mmio
        m.phys_addr, m.len, m.is_write = address, len(data), int(write)
        ctypes.memmove(m.data, data, len(data))
        return abi.KVM_EXIT_MMIO

    return step


def emulation_failure(code: bytes) -> Callable[[FakeVcpu], int]:
    def step(vcpu: FakeVcpu) -> int:
        failure = vcpu.state.exit.emulation_failure
        failure.suberror = abi.KVM_INTERNAL_ERROR_EMULATION
        failure.ndata = 3
        failure.flags = abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        failure.insn_size = len(code)
        ctypes.memmove(failure.insn_bytes, code, len(code))
        return abi.KVM_EXIT_INTERNAL_ERROR

    return step


def plain(reason: int) -> Callable[[FakeVcpu], int]:
    return lambda vcpu: reason
