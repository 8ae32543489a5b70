"""``/dev/kvm`` and a VM file descriptor: capabilities, guest memory slots, the in-kernel
interrupt controllers and timer, interrupt lines, ioeventfds and irqfds.

Thin and synchronous: every method is one or two ioctls. VM ioctls are safe from any thread
(KVM serialises them), which is what lets the trio loop raise interrupts while the vCPU thread
sits in ``KVM_RUN``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emulator.kvm import abi, ioctls
from emulator.memory import GuestMemory

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "KVM_DEVICE",
    "IrqfdLine",
    "Kvm",
    "KvmError",
    "KvmFlavor",
    "KvmIrqLine",
    "Vm",
    "detect_flavor",
    "ioctl",
]

KVM_DEVICE = "/dev/kvm"
#: Present when /dev/kvm is the "pagetable-based virtual machine" module (see NOTES.md).
PVM_MODULE = "/sys/module/kvm_pvm"


class KvmError(Exception):
    """KVM is missing or refused something the VMM needs."""


@dataclass(frozen=True)
class KvmFlavor:
    """Which KVM this host has, and so which work-arounds the VMM applies."""

    #: The module providing /dev/kvm: "kvm_intel", "kvm_amd", "kvm_pvm" or "unknown".
    module: str

    @property
    def is_pvm(self) -> bool:
        """An emulated KVM: the guest kernel runs inside KVM's instruction emulator."""
        return self.module == "kvm_pvm"


def detect_flavor(sys_module: str = "/sys/module") -> KvmFlavor:
    for module in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(os.path.join(sys_module, module)):
            return KvmFlavor(module)
    return KvmFlavor("unknown")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: int | WriteableBuffer = 0) -> int:
    """``fcntl.ioctl`` with an int, or with a ctypes object the kernel may read and write.

    An int argument too large for a C ``int`` (fcntl's limit) goes through libc directly as
    the ``unsigned long`` the kernel reads (addresses such as KVM_SET_TSS_ADDR's).
    """
    if isinstance(arg, int):
        if arg <= 0x7FFFFFFF:
            return fcntl.ioctl(fd, request, arg)
        result: int = _libc.ioctl(fd, request, arg)
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result
    # With a writable buffer and mutate_flag True fcntl returns the ioctl's int result.
    mutated: int = fcntl.ioctl(fd, request, arg, True)
    return mutated


class Kvm:
    """The system file descriptor: version, capabilities, supported CPUID."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"cannot open {path}: {exc.strerror}") from exc
        version = ioctl(self.fd, ioctls.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"{path}: KVM API version {version}, expected {abi.KVM_API_VERSION}")
        self.flavor = detect_flavor()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, capability: int) -> int:
        return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, capability)

    def require(self, *capabilities: tuple[int, str]) -> None:
        missing = [name for cap, name in capabilities if not self.check_extension(cap)]
        if missing:
            raise KvmError(f"{KVM_DEVICE} lacks {', '.join(missing)}")

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, ioctls.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> abi.KvmCpuid2:
        cpuid = abi.KvmCpuid2(nent=abi.KVM_MAX_CPUID_ENTRIES)
        ioctl(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID, cpuid)
        return cpuid

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, ioctls.KVM_CREATE_VM, 0))


class Vm:
    """A VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._next_slot = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, capability: int) -> int:
        return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, capability)

    def map_memory(self, memory: GuestMemory) -> None:
        """Give KVM every RAM region, one slot each."""
        for region in memory.regions:
            slot = abi.KvmUserspaceMemoryRegion(
                slot=self._next_slot,
                flags=0,
                guest_phys_addr=region.guest_base,
                memory_size=region.size,
                userspace_addr=region.host_address,
            )
            ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, slot)
            self._next_slot += 1

    def set_tss_address(self, address: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, address)

    def set_identity_map_address(self, address: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(address))

    def create_irqchip(self) -> None:
        """The in-kernel PIC pair, IOAPIC and local APICs."""
        ioctl(self.fd, ioctls.KVM_CREATE_IRQCHIP)

    def create_pit(self) -> None:
        """The in-kernel i8254 timer (ports 0x40-0x43; port 0x61 as a dummy speaker)."""
        ioctl(self.fd, ioctls.KVM_CREATE_PIT2, abi.KvmPitConfig(flags=abi.KVM_PIT_SPEAKER_DUMMY))

    def set_irq_line(self, gsi: int, high: bool) -> None:
        ioctl(self.fd, ioctls.KVM_IRQ_LINE, abi.KvmIrqLevel(irq=gsi, level=int(high)))

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        """Writing ``eventfd`` raises (and lowers) ``gsi`` in the kernel."""
        ioctl(self.fd, ioctls.KVM_IRQFD, abi.KvmIrqfd(fd=eventfd, gsi=gsi))

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        ioctl(self.fd, ioctls.KVM_IRQFD,
               abi.KvmIrqfd(fd=eventfd, gsi=gsi, flags=abi.KVM_IRQFD_FLAG_DEASSIGN))

    def register_ioeventfd(self, eventfd: int, address: int, length: int,
                           datamatch: int | None = None, *, pio: bool = False) -> None:
        """Guest writes of ``length`` bytes to ``address`` (matching ``datamatch``) signal
        ``eventfd`` in the kernel instead of exiting to user space."""
        flags = abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        ioctl(self.fd, ioctls.KVM_IOEVENTFD, abi.KvmIoeventfd(
            datamatch=datamatch or 0, addr=address, len=length, fd=eventfd, flags=flags))

    def unregister_ioeventfd(self, eventfd: int, address: int, length: int,
                             datamatch: int | None = None, *, pio: bool = False) -> None:
        flags = abi.KVM_IOEVENTFD_FLAG_DEASSIGN | (abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        ioctl(self.fd, ioctls.KVM_IOEVENTFD, abi.KvmIoeventfd(
            datamatch=datamatch or 0, addr=address, len=length, fd=eventfd, flags=flags))

    def create_vcpu_fd(self, index: int) -> int:
        return ioctl(self.fd, ioctls.KVM_CREATE_VCPU, index)


class KvmIrqLine:
    """An interrupt line driven by ``KVM_IRQ_LINE`` (any thread)."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi

    def pulse(self) -> None:
        self.vm.set_irq_line(self.gsi, True)
        self.vm.set_irq_line(self.gsi, False)

    def set_level(self, high: bool) -> None:
        self.vm.set_irq_line(self.gsi, high)


class IrqfdLine:
    """An edge-triggered line through an irqfd: one eventfd write per interrupt, no ioctl."""

    def __init__(self, eventfd: int) -> None:
        self.eventfd = eventfd

    def pulse(self) -> None:
        os.eventfd_write(self.eventfd, 1)

    def set_level(self, high: bool) -> None:
        if high:
            self.pulse()
