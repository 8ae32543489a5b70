"""Writing the zero page (``struct boot_params``), apart from loading the kernel -- as
linux-loader keeps ``BootConfigurator`` apart from ``KernelLoader``.

The setup header comes from the bzImage when there is one (as QEMU and the kernel's own boot
loaders copy it), else a minimal one; the loader fields are then filled in: loader type,
command line, initrd, e820 map, ACPI root pointer.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from emulator.arch.x86_64.e820 import E820Entry
from emulator.loader.bootparam_abi import (
    BOOT_FLAG,
    E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    SETUP_HEADER_MAGIC,
    BootParams,
)
from emulator.memory import GuestMemory

__all__ = ["BootConfig", "write_boot_params"]

#: Kernel alignment announced for an ELF vmlinux (it is loaded at its link address anyway).
DEFAULT_KERNEL_ALIGNMENT = 0x0100_0000


@dataclass(frozen=True)
class BootConfig:
    """What goes into the zero page besides the kernel's own header."""

    cmdline_addr: int
    cmdline_size: int
    e820: list[E820Entry]
    initrd_addr: int = 0
    initrd_size: int = 0
    #: The bzImage's setup header bytes (from offset 0x1f1), or None for an ELF vmlinux.
    setup_header: bytes | None = None
    #: Where the ACPI RSDP is (0: none); kernels since 5.0 read it here before scanning.
    acpi_rsdp_addr: int = 0


def build_boot_params(config: BootConfig) -> BootParams:
    params = BootParams()
    if config.setup_header is not None:
        raw = config.setup_header[: ctypes.sizeof(params.hdr)]
        ctypes.memmove(ctypes.addressof(params.hdr), raw, len(raw))
    hdr = params.hdr
    hdr.boot_flag = BOOT_FLAG
    hdr.header = SETUP_HEADER_MAGIC
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags |= LOADED_HIGH
    if not hdr.kernel_alignment:
        hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT
    hdr.vid_mode = 0xFFFF  # "normal": no video mode change
    hdr.cmd_line_ptr = config.cmdline_addr
    hdr.cmdline_size = config.cmdline_size
    hdr.ramdisk_image = config.initrd_addr
    hdr.ramdisk_size = config.initrd_size
    params.acpi_rsdp_addr = config.acpi_rsdp_addr
    if len(config.e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(config.e820)} e820 entries do not fit the zero page")
    params.e820_entries = len(config.e820)
    for i, entry in enumerate(config.e820):
        params.e820_table[i].addr = entry.addr
        params.e820_table[i].size = entry.size
        params.e820_table[i].type = entry.type
    return params


def write_boot_params(memory: GuestMemory, address: int, config: BootConfig) -> None:
    memory.write(address, bytes(build_boot_params(config)))
