"""bzImage parsing and the kernel/initrd loaders on synthetic images."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.loader import load_initrd, load_kernel
from emulator.loader.bzimage import parse_bzimage
from emulator.memory import GuestMemory
from tests.emulator.loader.elfutil import gzip_payload, make_bzimage, make_elf
from vdiskfs.errors import FormatError, UnsupportedError

ELF = make_elf([(0x100000, b"\x90" * 4096, 0x2000)], entry=0x100000)


def test_payload_is_extracted_and_loaded(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage(gzip_payload(ELF)))
    memory = GuestMemory.for_tests(8 << 20)
    kernel = load_kernel(memory, str(path))
    assert kernel.kind == "bzImage/gzip"
    assert (kernel.entry, kernel.end) == (0x100000, 0x102000)
    assert kernel.cmdline_capacity == 2048
    assert kernel.initrd_addr_max == 0x7FFFFFFF
    assert kernel.setup_header is not None and kernel.setup_header[0x202 - 0x1F1:][:4] == b"HdrS"
    assert memory.read(0x100000, 4) == b"\x90" * 4


def test_elf_vmlinux(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(ELF)
    kernel = load_kernel(GuestMemory.for_tests(8 << 20), str(path))
    assert kernel.kind == "elf" and kernel.setup_header is None


def test_old_protocol_is_refused() -> None:
    with pytest.raises(UnsupportedError, match=r"older than 2\.08"):
        parse_bzimage(make_bzimage(gzip_payload(ELF), version=0x0207))


def test_payload_outside_the_file_is_refused() -> None:
    image = bytearray(make_bzimage(gzip_payload(ELF)))
    image[0x24C:0x250] = (1 << 30).to_bytes(4, "little")  # payload_length
    with pytest.raises(FormatError, match="outside the file"):
        parse_bzimage(bytes(image))


def test_neither_elf_nor_bzimage(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"junk" * 1000)
    with pytest.raises(FormatError, match="neither"):
        load_kernel(GuestMemory.for_tests(1 << 20), str(path))


def test_initrd_goes_high_and_page_aligned(tmp_path: Path) -> None:
    kernel_path, initrd_path = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel_path.write_bytes(ELF)
    initrd_path.write_bytes(b"cpio" * 1000)
    memory = GuestMemory.for_tests(8 << 20)
    kernel = load_kernel(memory, str(kernel_path))
    address, size = load_initrd(memory, str(initrd_path), kernel)
    assert size == 4000 and address % 4096 == 0
    assert address + size <= 8 << 20 and address > (8 << 20) - 8192
    assert memory.read(address, 4) == b"cpio"


def test_initrd_too_big(tmp_path: Path) -> None:
    kernel_path, initrd_path = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel_path.write_bytes(ELF)
    initrd_path.write_bytes(bytes(3 << 20))
    memory = GuestMemory.for_tests(4 << 20)
    kernel = load_kernel(memory, str(kernel_path))
    with pytest.raises(FormatError, match="does not fit"):
        load_initrd(memory, str(initrd_path), kernel)
