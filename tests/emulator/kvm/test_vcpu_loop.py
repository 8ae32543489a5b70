"""The vCPU loop's exit handling, and the PVM system-call completion, on a fake vCPU."""

from __future__ import annotations

import struct

from emulator.devices.bus import Bus
from emulator.kvm import abi, pvm
from emulator.kvm.vcpu import Vcpu, VcpuLoop
from emulator.kvm.vcpu_protocol import VcpuProtocol
from emulator.memory import GuestMemory
from emulator.outcome import OutcomeKind, StopSignal
from tests.emulator.kvm.fake import (
    IO_DATA_OFFSET,
    FakeVcpu,
    emulation_failure,
    io_in,
    io_out,
    mmio,
    plain,
)


class Recorder:
    def __init__(self, answer: bytes = b"\x5a") -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.answer = answer

    def read(self, offset: int, size: int) -> bytes:
        return self.answer * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def make_loop(*, pvm_fixups: bool = False) -> tuple[VcpuLoop, FakeVcpu, Recorder, Recorder]:
    vcpu = FakeVcpu()
    pio, mmio_bus = Bus("pio"), Bus("mmio")
    port_device, mmio_device = Recorder(), Recorder(b"\x11")
    pio.insert(0x3F8, 8, "serial", port_device)
    mmio_bus.insert(0xD000_0000, 0x1000, "vda", mmio_device)
    loop = VcpuLoop(vcpu, GuestMemory.for_tests(1 << 20), pio, mmio_bus, StopSignal(),
                    pvm_fixups=pvm_fixups)
    return loop, vcpu, port_device, mmio_device


def test_io_and_mmio_exits_reach_the_devices() -> None:
    loop, vcpu, port_device, mmio_device = make_loop()
    seen: list[bytes] = []

    def after_mmio_read(v: FakeVcpu) -> int:
        # What the loop answered is in the run page when the vCPU resumes.
        seen.append(bytes(v.state.exit.mmio.data[:4]))
        return io_in(0x3FD, 1)(v)

    def after_io_read(v: FakeVcpu) -> int:
        seen.append(bytes(v.run_page[IO_DATA_OFFSET : IO_DATA_OFFSET + 1]))
        return abi.KVM_EXIT_SHUTDOWN

    vcpu.script = [
        io_out(0x3F8, b"A"),
        mmio(0xD000_0070, b"\x01\x00\x00\x00", write=True),
        mmio(0xD000_0000, bytes(4), write=False),
        after_mmio_read,
        after_io_read,
    ]
    loop.run()
    assert port_device.writes == [(0, b"A")]
    assert mmio_device.writes == [(0x70, b"\x01\x00\x00\x00")]
    assert seen == [b"\x11" * 4, b"\x5a"]
    stats = loop.stats()
    assert stats["exits"] == {"io": 2, "mmio": 2, "shutdown": 1}
    assert stats["pio_by_device"] == {"serial": 2}
    outcome = loop.stop.outcome
    assert outcome is not None and outcome.kind == OutcomeKind.TRIPLE_FAULT
    assert "RIP=" in outcome.reason


def test_unknown_instruction_ends_the_run_with_its_bytes() -> None:
    loop, vcpu, _, _ = make_loop(pvm_fixups=False)
    vcpu.regs.rip = 0xFFFFFFFF81000000
    vcpu.script = [emulation_failure(b"\xcc")]  # int3: fixed only where KVM is emulated
    loop.run()
    outcome = loop.stop.outcome
    assert outcome is not None and outcome.kind == OutcomeKind.EMULATION_FAILURE
    assert outcome.status != 0
    assert "RIP=0xffffffff81000000" in outcome.reason and "bytes cc" in outcome.reason


def test_pvm_fixups_run_ldmxcsr_and_stmxcsr() -> None:
    """kernel_fpu_begin's ``ldmxcsr 0x4(%rsp)``, then ``stmxcsr -0x8(%rbp)``: MXCSR moves
    between guest memory and the vCPU, RIP steps over each."""
    loop, vcpu, _, _ = make_loop(pvm_fixups=True)
    vcpu.page_table[0xFFFF_C900_0000_0000] = 0x8000  # the stack page
    vcpu.regs.rip = 0x1000
    vcpu.regs.rsp = vcpu.regs.rbp = 0xFFFF_C900_0000_0100
    loop.memory.write(0x8104, (0x1F80 | 0x40).to_bytes(4, "little"))  # DAZ set
    vcpu.script = [emulation_failure(b"\x0f\xae\x54\x24\x04"),
                   emulation_failure(b"\x0f\xae\x5d\xf8"), plain(abi.KVM_EXIT_SHUTDOWN)]
    loop.run()
    assert loop.fixups == {"ldmxcsr": 1, "stmxcsr": 1}
    assert vcpu.fpu.mxcsr == 0x1FC0
    assert loop.memory.read(0x80F8, 4) == (0x1FC0).to_bytes(4, "little")
    assert vcpu.regs.rip == 0x1000 + 5 + 4


def test_an_mxcsr_operand_outside_ram_stops_the_guest() -> None:
    loop, vcpu, _, _ = make_loop(pvm_fixups=True)
    vcpu.regs.rsp = 0xFFFF_C900_0000_0100  # not mapped
    vcpu.script = [emulation_failure(b"\x0f\xae\x54\x24\x04")]
    loop.run()
    assert loop.fixups == {}
    outcome = loop.stop.outcome
    assert outcome is not None and "bytes 0f ae 54 24 04" in outcome.reason


def test_pvm_fixups_complete_int3_and_fwait() -> None:
    loop, vcpu, _, _ = make_loop(pvm_fixups=True)
    vcpu.regs.rip = 0x1000
    vcpu.script = [emulation_failure(b"\xcc"), emulation_failure(b"\x9b"),
                   emulation_failure(b"\x0f\x0b"), plain(abi.KVM_EXIT_SHUTDOWN)]
    loop.run()
    assert loop.fixups == {"int3": 1, "fwait": 1}
    assert len(vcpu.events) == 1 and vcpu.events[0].exception.nr == 3
    assert vcpu.events[0].exception.injected == 1
    assert vcpu.regs.rip == 0x1002
    outcome = loop.stop.outcome
    assert outcome is not None and outcome.kind == OutcomeKind.EMULATION_FAILURE  # ud2
    assert "bytes 0f 0b" in outcome.reason


def test_stop_from_another_thread_kicks_the_vcpu() -> None:
    loop, vcpu, _, _ = make_loop()
    vcpu.script = [plain(abi.KVM_EXIT_INTR)]

    def stop_then_intr(v: FakeVcpu) -> int:
        loop.stop.stop(OutcomeKind.INTERRUPTED, "test")
        return abi.KVM_EXIT_INTR

    vcpu.script = [stop_then_intr]
    loop.run()
    assert vcpu.kicks == 1
    assert loop.stop.outcome is not None and loop.stop.outcome.reason == "test"


# -- the PVM system-call completion -------------------------------------------------------------

LSTAR = 0xFFFFFFFF81200040
PF_ENTRY = 0xFFFFFFFF81200AF0
IDT = 0xFFFFFE0000000000
KSTACK = 0xFFFFC90000004000


def pvm_guest() -> tuple[pvm.SyscallCompleter, FakeVcpu, GuestMemory]:
    vcpu = FakeVcpu()
    memory = GuestMemory.for_tests(1 << 20)
    vcpu.msrs = {pvm.MSR_LSTAR: LSTAR, pvm.MSR_STAR: 0x0023_0010_0000_0000,
                 pvm.MSR_SYSCALL_MASK: 0x47700}
    # The IDT's page-fault gate, at guest-physical 0x3000.
    vcpu.page_table[IDT] = 0x3000
    gate = struct.pack("<HHBBHII", PF_ENTRY & 0xFFFF, 0x10, 0, 0x8E, (PF_ENTRY >> 16) & 0xFFFF,
                       PF_ENTRY >> 32, 0)
    memory.write(0x3000 + 16 * 14, gate)
    vcpu.sregs.cr0 = 0x80050033
    vcpu.sregs.idt.base = IDT
    vcpu.sregs.idt.limit = 4095
    vcpu.page_table[KSTACK - 0x1000] = 0x5000
    return pvm.SyscallCompleter(vcpu, memory), vcpu, memory


def fault_at_entry(vcpu: FakeVcpu, memory: GuestMemory, *, rip: int, cs: int, error: int,
                   cr2: int) -> None:
    """The state at the page-fault entry: the hardware frame on the kernel stack."""
    vcpu.regs.rip = PF_ENTRY
    vcpu.regs.rsp = KSTACK - 48
    vcpu.regs.rcx = 0x49641B  # what PVM's half-done syscall left: return address...
    vcpu.regs.r11 = 0x246  # ...and the user's RFLAGS
    vcpu.sregs.cr2 = cr2
    vcpu.sregs.cs.selector = 0x10
    memory.write(0x5000 + 0x1000 - 48,
                 struct.pack("<6Q", error, rip, cs, 0x10002, 0x7FFE3E0991D0, 0x2B))


def test_breakpoint_goes_on_the_page_fault_entry_once_the_idt_is_there() -> None:
    completer, vcpu, _ = pvm_guest()
    vcpu.sregs.idt.base = 0x1000  # the early, physical IDT: not yet
    completer.poll()
    assert vcpu.debug == []
    vcpu.sregs.idt.base = IDT
    completer.poll()
    assert vcpu.debug == [(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP, (PF_ENTRY,))]
    completer.poll()  # no re-arming while nothing changed
    assert len(vcpu.debug) == 1


def test_half_done_syscall_is_completed() -> None:
    completer, vcpu, memory = pvm_guest()
    completer.poll()
    fault_at_entry(vcpu, memory, rip=LSTAR, cs=0x33, error=0x15, cr2=LSTAR)
    completer.on_debug_exit()
    assert completer.completed == 1
    assert vcpu.regs.rip == LSTAR
    assert vcpu.regs.rsp == 0x7FFE3E0991D0  # the user stack, as SYSCALL leaves it
    assert vcpu.regs.rcx == 0x49641B and vcpu.regs.r11 == 0x246
    assert vcpu.regs.rflags == (0x246 & ~0x47700) | 2
    assert (vcpu.sregs.cs.selector, vcpu.sregs.cs.dpl, vcpu.sregs.cs.l) == (0x10, 0, 1)
    assert (vcpu.sregs.ss.selector, vcpu.sregs.ss.dpl) == (0x18, 0)
    assert len(vcpu.debug) == 1  # the breakpoint stays; no step needed


def test_other_page_faults_are_stepped_over() -> None:
    completer, vcpu, memory = pvm_guest()
    completer.poll()
    fault_at_entry(vcpu, memory, rip=0x401000, cs=0x33, error=0x14, cr2=0x401000)
    completer.on_debug_exit()
    assert completer.completed == 0 and completer.breakpoint_hits == 1
    assert vcpu.debug[-1] == (abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP, ())
    assert vcpu.regs.rip == PF_ENTRY  # untouched
    completer.on_debug_exit()  # the step is done: breakpoint back
    assert vcpu.debug[-1] == (abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP, (PF_ENTRY,))


def test_the_fake_and_the_kvm_vcpu_provide_the_protocol() -> None:
    # The loop and the PVM completer take a VcpuProtocol: the fake must stay one, and so must
    # the real class (its data attributes are set in __init__, so check its methods).
    assert isinstance(FakeVcpu(), VcpuProtocol)
    methods = [name for name in dir(VcpuProtocol)
               if not name.startswith("_") and callable(getattr(VcpuProtocol, name))]
    assert "translate" in methods and "run" in methods
    for name in methods:
        assert callable(getattr(Vcpu, name, None)), name
