"""Tiny ELF and bzImage builders for the loader tests (the real kernel is tested by booting)."""

from __future__ import annotations

import gzip
import struct

from emulator.loader.bootparam_abi import SETUP_HEADER_OFFSET, SetupHeader

PHDR_SIZE = 56


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, *, machine: int = 62,
             elf_class: int = 2) -> bytes:
    """An ELF64 executable with one PT_LOAD per ``(paddr, data, memsz)``."""
    phoff = 64
    data_start = phoff + PHDR_SIZE * len(segments)
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, entry, phoff, 0, 0, 64,
                         PHDR_SIZE, len(segments), 64, 0, 0)
    phdrs, blobs, offset = b"", b"", data_start
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, offset, 0xFFFFFFFF80000000 + paddr, paddr,
                             len(data), memsz, 0x1000)
        blobs += data
        offset += len(data)
    return header + phdrs + blobs


def make_bzimage(payload: bytes, *, version: int = 0x020F, setup_sects: int = 1,
                 cmdline_size: int = 2047) -> bytes:
    """A bzImage shell: boot sector + setup sectors with the header, then ``payload``."""
    header = SetupHeader()
    header.setup_sects = setup_sects
    header.boot_flag = 0xAA55
    header.header = 0x53726448
    header.version = version
    header.jump = 0x6AEB  # jmp over the header: byte 0x201 gives its end (0x202 + 0x6a)
    header.xloadflags = 1
    header.cmdline_size = cmdline_size
    header.initrd_addr_max = 0x7FFFFFFF
    header.kernel_alignment = 0x200000
    header.payload_offset = 0x100
    header.payload_length = len(payload)
    setup = bytearray((setup_sects + 1) * 512)
    raw = bytes(header)
    setup[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(raw)] = raw
    protected_mode = bytes(0x100) + payload + struct.pack("<I", 0)
    return bytes(setup) + protected_mode


def gzip_payload(data: bytes) -> bytes:
    return gzip.compress(data) + struct.pack("<I", len(data))
