"""Work-arounds for an emulated KVM: the ``kvm_pvm`` module ("pagetable-based virtual machine").

Where /dev/kvm is PVM (the VMM itself runs in a VM without hardware virtualization), an
unmodified guest kernel runs largely inside KVM's instruction emulator, and three things differ
from hardware KVM (measured, see ``/work/shared/notes/kvm-here.md`` and ``emulator/NOTES.md``):

- ``KVM_SET_CPUID2`` does not hide CPU features from the guest: it reads the host's CPUID. The
  features the emulator cannot run are hidden on the kernel command line instead
  (:data:`CMDLINE_MASKS`).
- A few instructions stop the vCPU with an emulation failure although the guest needs them:
  ``int3`` (the kernel's self-test and its live text patching), ``fwait``, and the fences. The
  VMM completes them itself (:func:`classify`): skip a no-op, or skip ``int3`` and inject the
  breakpoint exception the guest expects. Re-entering without a fix-up fails again.
  ``ldmxcsr``/``stmxcsr`` (``kernel_fpu_begin``) it runs for the guest
  (:func:`complete_mxcsr`: decode the operand, move MXCSR through ``KVM_GET/SET_FPU``).
- A ``syscall`` from guest user mode is only half done: RCX, R11 and RIP (= LSTAR) are set,
  but the vCPU stays in user mode, so fetching the kernel's entry point faults. The VMM
  finishes the job (:class:`SyscallCompleter`): a hardware breakpoint on the guest's
  page-fault entry catches exactly that fault, and the VMM switches to the kernel's CS/SS
  (from STAR), restores the user RSP and masks RFLAGS (FMASK), as the instruction would have.

On hardware KVM none of this is applied.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emulator.kvm import abi

if TYPE_CHECKING:
    from emulator.kvm.vcpu_protocol import VcpuRegisters
    from emulator.memory import GuestMemory

__all__ = ["CMDLINE_MASKS", "CMDLINE_SPEED", "Fixup", "MxcsrAccess", "SyscallCompleter", "classify",
           "complete_mxcsr", "decode_mxcsr"]

#: Kernel arguments hiding what PVM's emulator lacks: PKU, FSGSBASE, the mitigations (page
#: table isolation among them), and via clearcpuid the bits for SMAP (308), SMEP (295),
#: FSGSBASE (288), PCID (145), INVPCID (298), CX16 (141), XSAVE (154), POPCNT (151), RDRAND
#: (158) and RDSEED (306). kvm-here.md's "noxsave" and "nopti" are left out: clearcpuid=154 and
#: mitigations=off do the same, and the kernel hands arguments it does not register on to
#: init (``init=/bin/sh`` would try to run a script called "noxsave").
#: Then the SIMD extensions that select vector code in the kernel -- SSSE3 (137), SSE4.1 (147),
#: SSE4.2 (148), AES (153), PCLMULQDQ (129): the emulator runs little SSE beyond moves, and a
#: distribution kernel's built-in BLAKE2s (the random pool) takes its SSSE3 path when the CPU
#: has it, entering it with ``kernel_fpu_begin``'s ``ldmxcsr``, an emulation failure (Debian's
#: 6.1 cloud kernel stopped there, at "ldmxcsr 0x4(%rsp)", after ~11 minutes of boot).
CMDLINE_MASKS: tuple[str, ...] = (
    "nopku",
    "nofsgsbase",
    "mitigations=off",
    "clearcpuid=308,295,288,145,298,141,154,151,158,306,137,147,148,153,129",
)

#: Kernel arguments that skip boot work a distribution kernel does in KVM's instruction emulator
#: for many minutes, where every instruction costs about a microsecond; none changes what the
#: guest does with its disks. Measured with Debian's 6.1 cloud kernel (``initcall_debug``): it
#: reached ``/init`` after 8.8 minutes with them, and had not after 45 without.
#: - ``initcall_blacklist``: ftrace's check of its 37,697 call sites (``kallsyms_lookup`` each,
#:   in a worker that held the CPU -- a soft lockup), and the trace-event enum update and
#:   tracefs event files, which held the event mutex while PID 1 waited over six minutes in
#:   ``init_kprobe_trace``. The guest has no tracefs events then.
#: - ``rodata=off``: no read-only remapping of the kernel image, nor CONFIG_DEBUG_WX's walk of
#:   every kernel page table after it (the first run fell silent there for over 17 minutes).
#: - ``cryptomgr.notests``: no self-test of every crypto algorithm as it registers.
#: A command line that sets one of these keys itself keeps its own value.
CMDLINE_SPEED: tuple[str, ...] = (
    "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs",
    "rodata=off",
    "cryptomgr.notests",
)

#: Breakpoint exception vector.
BP_VECTOR = 3


@dataclass(frozen=True)
class Fixup:
    """What the VMM does for an instruction the emulator refused."""

    name: str
    #: Bytes to advance RIP by.
    length: int
    #: Exception vector to inject after advancing (a trap, so RIP points past it), or None.
    inject: int | None = None


_FENCES = {
    b"\x0f\xae\xe8": "lfence",
    b"\x0f\xae\xf0": "mfence",
    b"\x0f\xae\xf8": "sfence",
}


def classify(instruction: bytes) -> Fixup | None:
    """The fix-up for the instruction at the failing RIP, or None when there is none."""
    if instruction[:1] == b"\xcc":
        return Fixup("int3", 1, inject=BP_VECTOR)
    if instruction[:1] == b"\x9b":
        return Fixup("fwait", 1)
    fence = _FENCES.get(bytes(instruction[:3]))
    if fence is not None:
        return Fixup(fence, 3)
    return None


#: The general registers in ModRM/SIB numbering (REX.B/X/R add 8).
_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SEGMENT_PREFIXES = {0x64: "fs", 0x65: "gs"}
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class MxcsrAccess:
    """``ldmxcsr m32`` (0F AE /2) or ``stmxcsr m32`` (0F AE /3), decoded (64-bit mode)."""

    store: bool
    #: Register names added into the address (base, then index with its scale).
    base: str | None
    index: str | None
    scale: int
    displacement: int
    rip_relative: bool
    segment: str | None
    #: Of the whole instruction.
    length: int

    def address(self, regs: abi.KvmRegs, sregs: abi.KvmSregs) -> int:
        address = self.displacement
        if self.base is not None:
            address += getattr(regs, self.base)
        if self.index is not None:
            address += getattr(regs, self.index) * self.scale
        if self.rip_relative:
            address += regs.rip + self.length
        if self.segment is not None:
            address += getattr(sregs, self.segment).base
        return address & _MASK64


def decode_mxcsr(code: bytes) -> MxcsrAccess | None:
    """The MXCSR load or store at the start of ``code`` (an FS/GS override and a REX prefix
    allowed), or None. KVM's instruction emulator has neither (its group 15 stops at
    fxsave/fxrstor), and ``kernel_fpu_begin`` runs ``ldmxcsr`` where a kernel uses SIMD."""
    i, segment, rex = 0, None, 0
    if code[i:i + 1] and code[i] in _SEGMENT_PREFIXES:
        segment = _SEGMENT_PREFIXES[code[i]]
        i += 1
    if code[i:i + 1] and 0x40 <= code[i] <= 0x4F:
        rex = code[i]
        i += 1
    if code[i:i + 2] != b"\x0f\xae" or len(code) < i + 3:
        return None
    modrm = code[i + 2]
    i += 3
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3 or reg not in (2, 3):
        return None  # a register form: the fences, or not an MXCSR access
    base: str | None = _GPRS[rm | (rex & 1) << 3]
    index, scale, rip_relative = None, 1, False
    disp_size = {0: 0, 1: 1, 2: 4}[mod]
    if rm == 4:
        if len(code) <= i:
            return None
        sib = code[i]
        i += 1
        scale = 1 << (sib >> 6)
        index_number = (sib >> 3) & 7 | (rex & 2) << 2
        index = None if index_number == 4 else _GPRS[index_number]
        base = _GPRS[(sib & 7) | (rex & 1) << 3]
        if sib & 7 == 5 and mod == 0:
            base, disp_size = None, 4
    elif rm == 5 and mod == 0:
        base, rip_relative, disp_size = None, True, 4
    if len(code) < i + disp_size:
        return None
    displacement = int.from_bytes(code[i:i + disp_size], "little", signed=True)
    return MxcsrAccess(reg == 3, base, index, scale, displacement, rip_relative, segment,
                       i + disp_size)


def complete_mxcsr(vcpu: VcpuRegisters, memory: GuestMemory, code: bytes) -> str | None:
    """Run the MXCSR load or store at RIP for the guest and step over it: the fix-up's name,
    or None when ``code`` is not one or its operand is not in guest RAM."""
    access = decode_mxcsr(code)
    if access is None:
        return None
    regs = vcpu.get_regs()
    gpa = vcpu.translate(access.address(regs, vcpu.get_sregs()))
    if gpa is None or (gpa & 0xFFF) > 0x1000 - 4 or not memory.contains(gpa, 4):
        return None
    fpu = vcpu.get_fpu()
    if access.store:
        memory.write(gpa, fpu.mxcsr.to_bytes(4, "little"))
    else:
        fpu.mxcsr = int.from_bytes(memory.read(gpa, 4), "little")
        vcpu.set_fpu(fpu)
    regs.rip += access.length
    vcpu.set_regs(regs)
    return "stmxcsr" if access.store else "ldmxcsr"


MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_SYSCALL_MASK = 0xC000_0084
#: Start of the kernel half of the x86_64 address space.
KERNEL_SPACE = 0xFFFF_8000_0000_0000
PAGE_FAULT_VECTOR = 14
#: Page-fault error code bits: the access came from user mode; it was an instruction fetch.
PF_USER = 1 << 2
PF_INSTRUCTION = 1 << 4
X86_CR0_PG = 1 << 31
#: Seconds between checks that the breakpoint still sits on the guest's page-fault entry. A
#: time, not a count of exits: the kernel moves its page-fault entry once (x86-64's early
#: ``early_idt_handler_array`` gate, then ``asm_exc_page_fault``), and a kernel booted with
#: ``quiet`` (Debian's grub default) makes so few exits in between that a check every 4096
#: exits never saw the move -- init died on its first system call.
RECHECK_SECONDS = 0.05
_IDT_GATE = struct.Struct("<HHBBHII")
_PF_FRAME = struct.Struct("<6Q")  # error code, RIP, CS, RFLAGS, RSP, SS


class SyscallCompleter:
    """Finishes the user-mode ``syscall`` instructions that PVM leaves in user mode.

    Cost: three debug exits per guest page fault (the breakpoint, then a single step over the
    entry's first instruction with the breakpoint off, since the resume flag is not honoured
    here), one per system call.
    """

    def __init__(self, vcpu: VcpuRegisters, memory: GuestMemory) -> None:
        self.vcpu = vcpu
        self.memory = memory
        #: The guest's page-fault entry point while a breakpoint is on it.
        self.handler: int | None = None
        self._stepping = False
        self._next_check = 0.0
        self.completed = 0
        self.breakpoint_hits = 0

    def stats(self) -> dict[str, int]:
        return {"syscalls_completed": self.completed,
                "page_fault_breakpoints": self.breakpoint_hits}

    def poll(self) -> None:
        """After a VM exit: put the breakpoint on the page-fault entry once the guest kernel
        has its IDT (then re-check now and then)."""
        if self._stepping:
            return
        now = time.monotonic()
        if self.handler is not None and now < self._next_check:
            return
        self._next_check = now + RECHECK_SECONDS
        handler = self._page_fault_entry()
        if handler is not None and handler != self.handler:
            self.handler = handler
            self._arm()

    def _arm(self) -> None:
        assert self.handler is not None
        self.vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP,
                                  (self.handler,))

    def _read_virtual(self, address: int, length: int) -> bytes | None:
        gpa = self.vcpu.translate(address)
        if gpa is None or (gpa & 0xFFF) + length > 0x1000 or not self.memory.contains(gpa, length):
            return None
        return self.memory.read(gpa, length)

    def _page_fault_entry(self) -> int | None:
        sregs = self.vcpu.get_sregs()
        if not sregs.cr0 & X86_CR0_PG or sregs.idt.base < KERNEL_SPACE:
            return None
        if sregs.idt.limit < 16 * (PAGE_FAULT_VECTOR + 1) - 1:
            return None
        gate = self._read_virtual(sregs.idt.base + 16 * PAGE_FAULT_VECTOR, 16)
        if gate is None:
            return None
        low, _selector, _ist, attributes, middle, high, _ = _IDT_GATE.unpack(gate)
        handler = low | middle << 16 | high << 32
        return handler if attributes & 0x80 and handler >= KERNEL_SPACE else None

    def on_debug_exit(self) -> None:
        """A KVM_EXIT_DEBUG: the breakpoint, or the end of the step over it."""
        if self._stepping:
            self._stepping = False
            self._arm()
            return
        regs = self.vcpu.get_regs()
        if regs.rip != self.handler:
            return
        self.breakpoint_hits += 1
        if self._complete_syscall(regs):
            return  # RIP is now the kernel's syscall entry, away from the breakpoint
        self._stepping = True
        self.vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)

    def _complete_syscall(self, regs: abi.KvmRegs) -> bool:
        frame = self._read_virtual(regs.rsp, _PF_FRAME.size)
        if frame is None:
            return False
        error, rip, cs, _rflags, user_rsp, ss = _PF_FRAME.unpack(frame)
        lstar = self.vcpu.get_msr(MSR_LSTAR)
        if (rip != lstar or cs & 3 != 3 or ss & 3 != 3
                or error & (PF_USER | PF_INSTRUCTION) != PF_USER | PF_INSTRUCTION):
            return False
        sregs = self.vcpu.get_sregs()
        if sregs.cr2 != lstar:
            return False
        # What SYSCALL does (Intel SDM vol. 2B): CS and SS from STAR[47:32], CPL 0, flat.
        kernel_cs = (self.vcpu.get_msr(MSR_STAR) >> 32) & 0xFFFC
        _flat(sregs.cs, kernel_cs, segment_type=0xB, long_mode=True)
        _flat(sregs.ss, kernel_cs + 8, segment_type=0x3, long_mode=False)
        self.vcpu.set_sregs(sregs)
        # PVM already put the return address in RCX and the user RFLAGS in R11.
        regs.rip = lstar
        regs.rsp = user_rsp
        regs.rflags = (regs.r11 & ~self.vcpu.get_msr(MSR_SYSCALL_MASK)) | 0x2
        self.vcpu.set_regs(regs)
        self.completed += 1
        return True


def _flat(segment: abi.KvmSegment, selector: int, *, segment_type: int, long_mode: bool) -> None:
    segment.selector = selector
    segment.base = 0
    segment.limit = 0xFFFFFFFF
    segment.type = segment_type
    segment.present = 1
    segment.dpl = 0
    segment.s = 1
    segment.l = int(long_mode)
    segment.db = int(not long_mode)
    segment.g = 1
    segment.avl = 0
    segment.unusable = 0
