"""What the exit-handling code needs of a vCPU, as a :class:`typing.Protocol`.

:class:`~emulator.kvm.vcpu.Vcpu` (a KVM vCPU file descriptor) and the tests' ``FakeVcpu`` (a
``kvm_run`` page in plain memory, scripted exits) both provide it; the run loop
(:class:`~emulator.kvm.vcpu.VcpuLoop`) and the PVM work-arounds (:mod:`emulator.kvm.pvm`) take it,
so neither imports the other's module for a type, as rust-vmm's ``vmm-vcpu`` trait does.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from emulator.kvm import abi

__all__ = ["VcpuProtocol", "VcpuRegisters"]


@runtime_checkable
class VcpuRegisters(Protocol):
    """Register access: all the PVM work-arounds use."""

    def get_regs(self) -> abi.KvmRegs: ...

    def set_regs(self, regs: abi.KvmRegs) -> None: ...

    def get_sregs(self) -> abi.KvmSregs: ...

    def set_sregs(self, sregs: abi.KvmSregs) -> None: ...

    def get_msr(self, index: int) -> int: ...

    def set_guest_debug(self, control: int, breakpoints: tuple[int, ...] = ()) -> None: ...

    def get_fpu(self) -> abi.KvmFpu: ...

    def set_fpu(self, fpu: abi.KvmFpu) -> None: ...

    def get_events(self) -> abi.KvmVcpuEvents: ...

    def set_events(self, events: abi.KvmVcpuEvents) -> None: ...

    def translate(self, linear: int) -> int | None:
        """The guest-physical address of a guest-virtual one (None: not mapped)."""
        ...


@runtime_checkable
class VcpuProtocol(VcpuRegisters, Protocol):
    """A vCPU the run loop can run: registers, the ``kvm_run`` page, ``run`` and ``kick``."""

    #: The shared ``kvm_run`` page: exit reason and data.
    run_page: memoryview
    state: abi.KvmRun
    #: The thread in ``run`` (set by the loop), for ``kick`` to signal; None outside it.
    thread_id: int | None

    def run(self) -> int:
        """One ``KVM_RUN``; the exit reason."""
        ...

    def kick(self) -> None:
        """Make the vCPU leave ``run`` soon (any thread)."""
        ...
