"""The transcribed KVM ABI: ioctl numbers as the kernel headers define them, and the PVM
fix-up table."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from emulator.kvm import abi, ioctls, pvm
from emulator.kvm.vm import detect_flavor

# Values from <linux/kvm.h> on x86_64 (as strace prints them).
KNOWN = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_SET_MSRS": 0x4008AE89,
}


@pytest.mark.parametrize(("name", "value"), sorted(KNOWN.items()))
def test_ioctl_numbers(name: str, value: int) -> None:
    assert getattr(ioctls, name) == value


def test_kvm_run_layout() -> None:
    assert abi.KvmRun.exit_reason.offset == 8
    assert abi.KvmRun.immediate_exit.offset == 1
    assert ctypes.sizeof(abi.KvmRunIo) == 16
    assert abi.KvmRunEmulationFailure.insn_bytes.offset == 17


@pytest.mark.parametrize(
    ("code", "name", "length", "inject"),
    [
        (b"\xcc\x90", "int3", 1, 3),
        (b"\x9b\xdb\xe2", "fwait", 1, None),
        (b"\x0f\xae\xe8", "lfence", 3, None),
        (b"\x0f\xae\xf0", "mfence", 3, None),
        (b"\x0f\xae\xf8", "sfence", 3, None),
    ],
)
def test_pvm_fixups(code: bytes, name: str, length: int, inject: int | None) -> None:
    fixup = pvm.classify(code)
    assert fixup is not None
    assert (fixup.name, fixup.length, fixup.inject) == (name, length, inject)


@pytest.mark.parametrize("code", [b"", b"\x0f\x05", b"\x0f\x01\xf8", b"\x90"])
def test_no_fixup_for_other_instructions(code: bytes) -> None:
    assert pvm.classify(code) is None


def test_detect_flavor(tmp_path: Path) -> None:
    assert detect_flavor(str(tmp_path)).module == "unknown"
    (tmp_path / "kvm_intel").mkdir()
    assert not detect_flavor(str(tmp_path)).is_pvm
    (tmp_path / "kvm_pvm").mkdir()
    assert detect_flavor(str(tmp_path)).is_pvm
