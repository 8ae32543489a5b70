"""The kernel command line the VMM builds: its defaults, and what it adds where /dev/kvm is the
emulated kvm_pvm (emulator.kvm.pvm), without overriding what the user gave."""

from __future__ import annotations

from emulator.kvm import pvm
from emulator.kvm.vm import KvmFlavor
from emulator.loader import LoadedKernel
from emulator.vmm import VmConfig, _build_cmdline

KERNEL = LoadedKernel(0x1000000, 0x1000000, 0x2000000, "elf", None, 2048, 0x7FFFFFFF)


def _words(append: str, module: str) -> list[str]:
    line = _build_cmdline(VmConfig(append=append), None, KERNEL, KvmFlavor(module),
                          [(0xD0000000, 5)])
    return str(line).split()


def test_pvm_adds_its_masks_and_speed_arguments() -> None:
    words = _words("root=/dev/vda1 ro", "kvm_pvm")
    assert words[:2] == ["root=/dev/vda1", "ro"]
    for arg in (*pvm.CMDLINE_MASKS, *pvm.CMDLINE_SPEED):
        assert arg in words
    assert words[-1] == "virtio_mmio.device=4K@0xd0000000:5"


def test_the_users_value_wins() -> None:
    words = _words("root=/dev/vda1 rodata=on initcall_blacklist=x console=hvc0", "kvm_pvm")
    assert "rodata=off" not in words and "rodata=on" in words
    assert [w for w in words if w.startswith("initcall_blacklist=")] == ["initcall_blacklist=x"]
    assert "console=ttyS0" not in words
    assert "cryptomgr.notests" in words


def test_hardware_kvm_gets_none_of_them() -> None:
    words = _words("root=/dev/vda1", "kvm_intel")
    for arg in (*pvm.CMDLINE_MASKS, *pvm.CMDLINE_SPEED):
        assert arg not in words
    assert "console=ttyS0" in words and "pci=off" in words
