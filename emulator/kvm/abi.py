"""KVM's user-space ABI for x86_64: constants and ``ctypes`` structures, transcribed from
``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h`` (Linux 6.1).

No logic here: the ioctl numbers are in :mod:`emulator.kvm.ioctls`, the code that uses them in
:mod:`emulator.kvm.vm` and :mod:`emulator.kvm.vcpu`. Sizes are checked against the kernel's at
import (``_check_sizes``), since a wrong size means a wrong ioctl number.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

KVM_API_VERSION = 12

# -- capabilities (KVM_CHECK_EXTENSION) --------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204

# -- exit reasons (kvm_run.exit_reason) ----------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "unknown",
    KVM_EXIT_EXCEPTION: "exception",
    KVM_EXIT_IO: "io",
    KVM_EXIT_HYPERCALL: "hypercall",
    KVM_EXIT_DEBUG: "debug",
    KVM_EXIT_HLT: "hlt",
    KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_IRQ_WINDOW_OPEN: "irq_window_open",
    KVM_EXIT_SHUTDOWN: "shutdown",
    KVM_EXIT_FAIL_ENTRY: "fail_entry",
    KVM_EXIT_INTR: "intr",
    KVM_EXIT_SET_TPR: "set_tpr",
    KVM_EXIT_TPR_ACCESS: "tpr_access",
    KVM_EXIT_NMI: "nmi",
    KVM_EXIT_INTERNAL_ERROR: "internal_error",
    KVM_EXIT_SYSTEM_EVENT: "system_event",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
#: kvm_run.emulation_failure.flags: insn_size/insn_bytes are valid.
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# kvm_guest_debug.control
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000

# KVM_IOEVENTFD flags
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

# KVM_IRQFD flags
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

# kvm_pit_config.flags
KVM_PIT_SPEAKER_DUMMY = 1

# kvm_vcpu_events.flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008

# KVM_CPUID_FLAG_* (kvm_cpuid_entry2.flags)
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

KVM_NR_INTERRUPTS = 256
KVM_MAX_CPUID_ENTRIES = 256


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = (
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    )


class KvmRegs(ctypes.Structure):
    _fields_ = tuple(
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )


class KvmSegment(ctypes.Structure):
    _fields_ = (
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    )


class KvmDtable(ctypes.Structure):
    _fields_ = (("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3))


class KvmSregs(ctypes.Structure):
    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class KvmFpu(ctypes.Structure):
    _fields_ = (
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    )


class _EventsException(ctypes.Structure):
    _fields_ = (
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    )


class _EventsInterrupt(ctypes.Structure):
    _fields_ = (("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8))


class _EventsNmi(ctypes.Structure):
    _fields_ = (("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8),
                ("pad", c_uint8))


class _EventsSmi(ctypes.Structure):
    _fields_ = (("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8),
                ("latched_init", c_uint8))


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = (
        ("exception", _EventsException),
        ("interrupt", _EventsInterrupt),
        ("nmi", _EventsNmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _EventsSmi),
        ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    )


class KvmIrqLevel(ctypes.Structure):
    _fields_ = (("irq", c_uint32), ("level", c_uint32))


class KvmIrqfd(ctypes.Structure):
    _fields_ = (
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    )


class KvmIoeventfd(ctypes.Structure):
    _fields_ = (
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    )


class KvmPitConfig(ctypes.Structure):
    _fields_ = (("flags", c_uint32), ("pad", c_uint32 * 15))


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = (
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    )


class KvmCpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` with room for KVM_MAX_CPUID_ENTRIES entries (the header alone is
    what the ioctl number encodes: 8 bytes)."""

    _fields_ = (
        ("nent", c_uint32),
        ("padding", c_uint32),
        ("entries", KvmCpuidEntry2 * KVM_MAX_CPUID_ENTRIES),
    )


class KvmMsrEntry(ctypes.Structure):
    _fields_ = (("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64))


class KvmMsrs(ctypes.Structure):
    """``struct kvm_msrs`` with room for 32 entries (the ioctl encodes the 8-byte header)."""

    _fields_ = (("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * 32))


class KvmEnableCap(ctypes.Structure):
    _fields_ = (("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4),
                ("pad", c_uint8 * 64))


class KvmTranslation(ctypes.Structure):
    _fields_ = (
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    )


class KvmGuestDebug(ctypes.Structure):
    """``struct kvm_guest_debug`` with the x86 ``kvm_guest_debug_arch`` (DR0-DR7)."""

    _fields_ = (("control", c_uint32), ("pad", c_uint32), ("debugreg", c_uint64 * 8))


class KvmLapicState(ctypes.Structure):
    _fields_ = (("regs", c_uint8 * 1024),)


# -- struct kvm_run (the page mapped from the vCPU fd) -----------------------------------------


class KvmRunIo(ctypes.Structure):
    _fields_ = (
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    )


class KvmRunMmio(ctypes.Structure):
    _fields_ = (
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    )


class KvmRunInternal(ctypes.Structure):
    _fields_ = (("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16))


class KvmRunEmulationFailure(ctypes.Structure):
    _fields_ = (
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    )


class KvmRunSystemEvent(ctypes.Structure):
    _fields_ = (("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16))


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = (("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32))


class KvmRunDebug(ctypes.Structure):
    _fields_ = (("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64),
                ("dr7", c_uint64))


class KvmRunException(ctypes.Structure):
    _fields_ = (("exception", c_uint32), ("error_code", c_uint32))


class KvmRunExit(ctypes.Union):
    _fields_ = (
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("internal", KvmRunInternal),
        ("emulation_failure", KvmRunEmulationFailure),
        ("system_event", KvmRunSystemEvent),
        ("fail_entry", KvmRunFailEntry),
        ("ex", KvmRunException),
        ("debug", KvmRunDebug),
        ("padding", ctypes.c_char * 256),
    )


class KvmRun(ctypes.Structure):
    _fields_ = (
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", KvmRunExit),
    )


def _check_sizes() -> None:
    expected = {
        KvmUserspaceMemoryRegion: 32,
        KvmRegs: 144,
        KvmSegment: 24,
        KvmSregs: 312,
        KvmFpu: 416,
        KvmVcpuEvents: 64,
        KvmIrqLevel: 8,
        KvmIrqfd: 32,
        KvmIoeventfd: 64,
        KvmPitConfig: 64,
        KvmCpuidEntry2: 40,
        KvmMsrEntry: 16,
        KvmEnableCap: 104,
        KvmTranslation: 24,
        KvmLapicState: 1024,
        KvmGuestDebug: 72,
    }
    for struct_type, size in expected.items():
        if ctypes.sizeof(struct_type) != size:  # pragma: no cover - a transcription error
            raise AssertionError(f"{struct_type.__name__} is {ctypes.sizeof(struct_type)} bytes")
    if KvmRun.exit.offset != 32:  # pragma: no cover
        raise AssertionError("kvm_run exit union is not at offset 32")


_check_sizes()
