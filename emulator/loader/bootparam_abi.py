"""``struct boot_params`` (the "zero page") and ``struct setup_header``, transcribed from
Linux's ``arch/x86/include/uapi/asm/bootparam.h``. No logic here; offsets checked at import.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64

#: "HdrS": setup_header.header of a kernel that has one.
SETUP_HEADER_MAGIC = 0x53726448
#: setup_header.boot_flag.
BOOT_FLAG = 0xAA55
#: Offset of the setup header in a bzImage and in boot_params.
SETUP_HEADER_OFFSET = 0x1F1
#: setup_header.type_of_loader: "undefined" boot loader.
LOADER_TYPE_UNDEFINED = 0xFF
#: setup_header.loadflags: the protected-mode kernel is loaded at 1 MiB or above.
LOADED_HIGH = 0x01
#: setup_header.xloadflags: the kernel has the 64-bit entry point.
XLF_KERNEL_64 = 0x01
E820_MAX_ENTRIES_ZEROPAGE = 128


class SetupHeader(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("setup_sects", u8),
        ("root_flags", u16),
        ("syssize", u32),
        ("ram_size", u16),
        ("vid_mode", u16),
        ("root_dev", u16),
        ("boot_flag", u16),
        ("jump", u16),
        ("header", u32),
        ("version", u16),
        ("realmode_swtch", u32),
        ("start_sys_seg", u16),
        ("kernel_version", u16),
        ("type_of_loader", u8),
        ("loadflags", u8),
        ("setup_move_size", u16),
        ("code32_start", u32),
        ("ramdisk_image", u32),
        ("ramdisk_size", u32),
        ("bootsect_kludge", u32),
        ("heap_end_ptr", u16),
        ("ext_loader_ver", u8),
        ("ext_loader_type", u8),
        ("cmd_line_ptr", u32),
        ("initrd_addr_max", u32),
        ("kernel_alignment", u32),
        ("relocatable_kernel", u8),
        ("min_alignment", u8),
        ("xloadflags", u16),
        ("cmdline_size", u32),
        ("hardware_subarch", u32),
        ("hardware_subarch_data", u64),
        ("payload_offset", u32),
        ("payload_length", u32),
        ("setup_data", u64),
        ("pref_address", u64),
        ("init_size", u32),
        ("handover_offset", u32),
        ("kernel_info_offset", u32),
    )


class BootE820Entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (("addr", u64), ("size", u64), ("type", u32))


class BootParams(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = (
        ("screen_info", u8 * 0x40),
        ("apm_bios_info", u8 * 0x14),
        ("_pad2", u8 * 4),
        ("tboot_addr", u64),
        ("ist_info", u8 * 16),
        ("acpi_rsdp_addr", u64),
        ("_pad3", u8 * 8),
        ("hd0_info", u8 * 16),
        ("hd1_info", u8 * 16),
        ("sys_desc_table", u8 * 16),
        ("olpc_ofw_header", u8 * 16),
        ("ext_ramdisk_image", u32),
        ("ext_ramdisk_size", u32),
        ("ext_cmd_line_ptr", u32),
        ("_pad4", u8 * 112),
        ("cc_blob_address", u32),
        ("edid_info", u8 * 128),
        ("efi_info", u8 * 32),
        ("alt_mem_k", u32),
        ("scratch", u32),
        ("e820_entries", u8),
        ("eddbuf_entries", u8),
        ("edd_mbr_sig_buf_entries", u8),
        ("kbd_status", u8),
        ("secure_boot", u8),
        ("_pad5", u8 * 2),
        ("sentinel", u8),
        ("_pad6", u8 * 1),
        ("hdr", SetupHeader),
        ("_pad7", u8 * (0x290 - 0x1F1 - 0x7B)),
        ("edd_mbr_sig_buffer", u32 * 16),
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),
        ("_pad8", u8 * 48),
        ("eddbuf", u8 * (6 * 82)),
        ("_pad9", u8 * 276),
    )


def _check_layout() -> None:
    checks = (
        (ctypes.sizeof(SetupHeader), 0x7B),
        (ctypes.sizeof(BootE820Entry), 20),
        (BootParams.hdr.offset, SETUP_HEADER_OFFSET),
        (BootParams.e820_entries.offset, 0x1E8),
        (BootParams.ext_cmd_line_ptr.offset, 0x0C8),
        (BootParams.e820_table.offset, 0x2D0),
        (BootParams.eddbuf.offset, 0xD00),
        (ctypes.sizeof(BootParams), 0x1000),
    )
    for got, want in checks:
        if got != want:  # pragma: no cover - a transcription error
            raise AssertionError(f"boot_params layout: {got:#x} != {want:#x}")


_check_layout()
