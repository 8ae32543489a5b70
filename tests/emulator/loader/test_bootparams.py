"""The zero page and the command line, checked at the byte offsets the kernel reads."""

from __future__ import annotations

import struct

import pytest

from emulator.arch.x86_64.e820 import E820Entry, E820Type, memory_map
from emulator.loader.bootparams import BootConfig, build_boot_params
from emulator.loader.cmdline import Cmdline, CmdlineError


def test_zero_page_fields_at_their_offsets() -> None:
    e820 = memory_map([(0, 64 << 20)])
    raw = bytes(build_boot_params(BootConfig(
        cmdline_addr=0x20000, cmdline_size=42, e820=e820, initrd_addr=0x3000000,
        initrd_size=12345, acpi_rsdp_addr=0xE0000)))
    assert len(raw) == 4096
    assert struct.unpack_from("<H", raw, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<Q", raw, 0x070)[0] == 0xE0000  # acpi_rsdp_addr
    assert raw[0x202:0x206] == b"HdrS"
    assert raw[0x210] == 0xFF  # type_of_loader
    assert raw[0x211] & 1  # LOADED_HIGH
    assert struct.unpack_from("<II", raw, 0x218) == (0x3000000, 12345)
    assert struct.unpack_from("<I", raw, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", raw, 0x238)[0] == 42
    assert raw[0x1E8] == 2
    assert struct.unpack_from("<QQI", raw, 0x2D0) == (0, 0x9FC00, 1)
    assert struct.unpack_from("<QQI", raw, 0x2D0 + 20) == (0x100000, (64 << 20) - 0x100000, 1)


def test_setup_header_from_the_bzimage_is_kept() -> None:
    header = bytearray(0x7B)
    header[0x206 - 0x1F1 : 0x208 - 0x1F1] = (0x020F).to_bytes(2, "little")
    header[0x230 - 0x1F1 : 0x234 - 0x1F1] = (0x200000).to_bytes(4, "little")
    params = build_boot_params(BootConfig(0x20000, 1, [], setup_header=bytes(header)))
    assert params.hdr.version == 0x020F
    assert params.hdr.kernel_alignment == 0x200000
    assert params.hdr.type_of_loader == 0xFF


def test_e820_map_with_the_32bit_hole() -> None:
    entries = memory_map([(0, 0xD000_0000), (1 << 32, 1 << 30)])
    assert entries == [
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x100000, 0xD000_0000 - 0x100000, E820Type.RAM),
        E820Entry(1 << 32, 1 << 30, E820Type.RAM),
    ]


def test_cmdline() -> None:
    cmdline = Cmdline(64)
    cmdline.append("console=ttyS0  root=/dev/vda1", "rw")
    assert str(cmdline) == "console=ttyS0 root=/dev/vda1 rw"
    assert cmdline.has("console") and cmdline.has("rw") and not cmdline.has("root=/dev")
    assert cmdline.as_bytes().endswith(b"\0")
    with pytest.raises(CmdlineError, match="exceeds"):
        cmdline.append("x" * 40)
    with pytest.raises(CmdlineError, match="printable"):
        Cmdline(64).append("a\x01b")


def test_refused_argument_leaves_the_line_unchanged() -> None:
    cmdline = Cmdline(32)
    cmdline.append("root=/dev/vda1")
    with pytest.raises(CmdlineError):
        cmdline.append("ok", "x" * 40)
    assert str(cmdline) == "root=/dev/vda1"
