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


@pytest.mark.parametrize(
    ("code", "store", "base", "index", "scale", "displacement", "rip_relative", "segment",
     "length"),
    [
        # As objdump names them: ldmxcsr 0x4(%rsp) (kernel_fpu_begin), stmxcsr -0x8(%rbp),
        # ldmxcsr 0x10(%rip), ldmxcsr %gs:0x1000, ldmxcsr 0x8(%r12,%rax,8).
        (b"\x0f\xae\x54\x24\x04\x83", False, "rsp", None, 1, 4, False, None, 5),
        (b"\x0f\xae\x5d\xf8", True, "rbp", None, 1, -8, False, None, 4),
        (b"\x0f\xae\x15\x10\x00\x00\x00", False, None, None, 1, 0x10, True, None, 7),
        (b"\x65\x0f\xae\x14\x25\x00\x10\x00\x00", False, None, None, 1, 0x1000, False, "gs",
         9),
        (b"\x41\x0f\xae\x54\xc4\x08", False, "r12", "rax", 8, 8, False, None, 6),
    ],
)
def test_mxcsr_accesses_are_decoded(code: bytes, store: bool, base: str | None,
                                    index: str | None, scale: int, displacement: int,
                                    rip_relative: bool, segment: str | None,
                                    length: int) -> None:
    assert pvm.decode_mxcsr(code) == pvm.MxcsrAccess(store, base, index, scale, displacement,
                                                     rip_relative, segment, length)


@pytest.mark.parametrize("code", [b"\x0f\xae\xe8", b"\x0f\xae\xd0", b"\x0f\xae\x54\x24",
                                  b"\x0f\xae\x04\x24", b"\x0f\xae", b""])
def test_not_an_mxcsr_access(code: bytes) -> None:
    """The fences, a register operand, a truncated one, fxsave (/0)."""
    assert pvm.decode_mxcsr(code) is None


def test_detect_flavor(tmp_path: Path) -> None:
    assert detect_flavor(str(tmp_path)).module == "unknown"
    (tmp_path / "kvm_intel").mkdir()
    assert not detect_flavor(str(tmp_path)).is_pvm
    (tmp_path / "kvm_pvm").mkdir()
    assert detect_flavor(str(tmp_path)).is_pvm
