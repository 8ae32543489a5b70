"""The boot vCPU's state for the Linux 64-bit boot protocol, one function per register group
(Firecracker's ``arch/x86_64/regs.rs``): general registers, segments and control registers
with the GDT and identity page tables they point at, FPU, local APIC, CPUID, MSRs.
"""

from __future__ import annotations

import struct

from emulator.arch.x86_64 import gdt, layout
from emulator.kvm import abi
from emulator.kvm.vcpu import Vcpu
from emulator.memory import GuestMemory

__all__ = [
    "setup_cpuid",
    "setup_fpu",
    "setup_lapic",
    "setup_msrs",
    "setup_page_tables",
    "setup_regs",
    "setup_sregs",
]

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page-table entry bits.
_PRESENT = 1 << 0
_WRITABLE = 1 << 1
_HUGE = 1 << 7

# Local APIC registers and LVT delivery modes.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

# MSRs.
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1

# CPUID leaf 1 bits.
_CPUID_ECX_HYPERVISOR = 1 << 31


def setup_regs(vcpu: Vcpu, entry: int) -> None:
    """RIP at the kernel's 64-bit entry, RSI at the zero page, a stack, interrupts off."""
    regs = abi.KvmRegs()
    regs.rflags = 0x2  # bit 1 is always set
    regs.rip = entry
    regs.rsp = layout.BOOT_STACK_POINTER
    regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = layout.ZERO_PAGE_START
    vcpu.set_regs(regs)


def setup_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (the protocol needs the kernel, the zero
    page and the command line mapped; the kernel builds its own tables next)."""
    memory.write_u64(layout.PML4_START, layout.PDPTE_START | _PRESENT | _WRITABLE)
    for i in range(layout.PDE_COUNT):
        pde_table = layout.PDE_START + i * layout.PAGE_SIZE
        memory.write_u64(layout.PDPTE_START + 8 * i, pde_table | _PRESENT | _WRITABLE)
        entries = b"".join(
            struct.pack("<Q", ((i * 512 + j) * layout.HUGE_PAGE_SIZE) | _PRESENT | _WRITABLE
                        | _HUGE)
            for j in range(512)
        )
        memory.write(pde_table, entries)


def setup_sregs(vcpu: Vcpu, memory: GuestMemory) -> None:
    """Long mode with paging: the boot GDT and an empty IDT in guest memory, flat segments,
    CR0/CR4/EFER for 64-bit, CR3 at the identity map."""
    memory.write(layout.BOOT_GDT_START, b"".join(struct.pack("<Q", e) for e in gdt.BOOT_GDT))
    memory.write_u64(layout.BOOT_IDT_START, 0)
    setup_page_tables(memory)

    sregs = vcpu.get_sregs()
    code = gdt.segment_from_entry(gdt.BOOT_GDT[2], gdt.CODE_SELECTOR)
    data = gdt.segment_from_entry(gdt.BOOT_GDT[3], gdt.DATA_SELECTOR)
    tss = gdt.segment_from_entry(gdt.BOOT_GDT[4], gdt.TSS_SELECTOR)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    sregs.gdt.base = layout.BOOT_GDT_START
    sregs.gdt.limit = 8 * len(gdt.BOOT_GDT) - 1
    sregs.idt.base = layout.BOOT_IDT_START
    sregs.idt.limit = 7
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
    sregs.cr3 = layout.PML4_START
    sregs.cr4 = X86_CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)


def setup_fpu(vcpu: Vcpu) -> None:
    """x87 control word and MXCSR at their reset values with all exceptions masked."""
    fpu = abi.KvmFpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def _set_lvt_mode(regs: bytearray, offset: int, mode: int) -> None:
    value = struct.unpack_from("<I", regs, offset)[0]
    value = (value & ~0x700) | (mode << 8)
    struct.pack_into("<I", regs, offset, value)


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT (the PIC's output, virtual-wire mode) and LINT1 as NMI, as a BIOS leaves
    them (Firecracker's ``interrupts::set_lint``)."""
    lapic = vcpu.get_lapic()
    regs = bytearray(lapic.regs)
    _set_lvt_mode(regs, APIC_LVT0, APIC_MODE_EXTINT)
    _set_lvt_mode(regs, APIC_LVT1, APIC_MODE_NMI)
    lapic.regs[:] = regs
    vcpu.set_lapic(lapic)


def setup_cpuid(vcpu: Vcpu, supported: abi.KvmCpuid2) -> None:
    """What KVM supports, with the hypervisor bit set and APIC ID 0. (On hardware KVM the
    guest sees nothing without this; on PVM it has no visible effect, see kvm/pvm.py.)"""
    for i in range(supported.nent):
        entry = supported.entries[i]
        if entry.function == 1:
            entry.ecx |= _CPUID_ECX_HYPERVISOR
            entry.ebx &= 0x00FF_FFFF  # initial APIC ID 0
    vcpu.set_cpuid(supported)


def setup_msrs(vcpu: Vcpu) -> None:
    """Fast string operations on, as firmware leaves them."""
    vcpu.set_msrs([(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING)])
