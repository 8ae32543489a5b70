"""KVM ioctl request numbers for x86_64, as ``include/uapi/linux/kvm.h`` defines them with the
``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros of ``asm-generic/ioctl.h``. No logic here."""

from __future__ import annotations

import ctypes

from emulator.kvm import abi

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


_sizeof = ctypes.sizeof
#: The variable-length structures encode only their 8-byte header in the request number.
_HEADER = 8

# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _HEADER)

# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, _sizeof(abi.KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, _sizeof(abi.KvmIrqLevel))
KVM_IRQFD = _iow(0x76, _sizeof(abi.KvmIrqfd))
KVM_CREATE_PIT2 = _iow(0x77, _sizeof(abi.KvmPitConfig))
KVM_IOEVENTFD = _iow(0x79, _sizeof(abi.KvmIoeventfd))
KVM_ENABLE_CAP = _iow(0xA3, _sizeof(abi.KvmEnableCap))

# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, _sizeof(abi.KvmRegs))
KVM_SET_REGS = _iow(0x82, _sizeof(abi.KvmRegs))
KVM_GET_SREGS = _ior(0x83, _sizeof(abi.KvmSregs))
KVM_SET_SREGS = _iow(0x84, _sizeof(abi.KvmSregs))
KVM_TRANSLATE = _iowr(0x85, _sizeof(abi.KvmTranslation))
KVM_GET_MSRS = _iowr(0x88, _HEADER)
KVM_SET_MSRS = _iow(0x89, _HEADER)
KVM_GET_FPU = _ior(0x8C, _sizeof(abi.KvmFpu))
KVM_SET_FPU = _iow(0x8D, _sizeof(abi.KvmFpu))
KVM_GET_LAPIC = _ior(0x8E, _sizeof(abi.KvmLapicState))
KVM_SET_LAPIC = _iow(0x8F, _sizeof(abi.KvmLapicState))
KVM_SET_CPUID2 = _iow(0x90, _HEADER)
KVM_SET_GUEST_DEBUG = _iow(0x9B, _sizeof(abi.KvmGuestDebug))
KVM_GET_VCPU_EVENTS = _ior(0x9F, _sizeof(abi.KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, _sizeof(abi.KvmVcpuEvents))
