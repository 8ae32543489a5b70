"""Loading an ELF vmlinux into guest memory, and refusing malformed ones."""

from __future__ import annotations

import pytest

from emulator.loader.elf import load_elf
from emulator.memory import GuestMemory
from tests.emulator.loader.elfutil import make_elf
from vdiskfs.errors import FormatError, UnsupportedError


def test_segments_land_at_their_physical_addresses() -> None:
    memory = GuestMemory.for_tests(4 << 20)
    memory.fill(0x200000, 0x3000, 0xEE)  # the loader must clear the bss
    image = make_elf([(0x100000, b"text" * 256, 0x1000), (0x200000, b"data", 0x3000)],
                     entry=0x100000)
    kernel = load_elf(memory, image)
    assert (kernel.entry, kernel.start, kernel.end) == (0x100000, 0x100000, 0x203000)
    assert memory.read(0x100000, 8) == b"texttext"
    assert memory.read(0x200000, 4) == b"data"
    assert memory.read(0x200004, 0x2FFC) == bytes(0x2FFC)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (b"MZ" + bytes(100), FormatError, "not an ELF"),
        (make_elf([(0x1000, b"x", 1)], 0x1000, elf_class=1), UnsupportedError, "64-bit"),
        (make_elf([(0x1000, b"x", 1)], 0x1000, machine=3), UnsupportedError, "not x86_64"),
        (make_elf([(0x1000, b"xy", 1)], 0x1000), FormatError, "outside the file"),
        (make_elf([(0x3FF000, b"x", 0x2000)], 0x3FF000), FormatError, "does not fit"),
        (make_elf([(0x1000, b"x", 1)], 0x5000), FormatError, "entry point"),
        (make_elf([], 0x1000), FormatError, "program headers"),
    ],
)
def test_malformed_elf(image: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        load_elf(GuestMemory.for_tests(4 << 20), image)


def test_truncated_program_headers() -> None:
    image = make_elf([(0x1000, b"x", 1)], 0x1000)[:80]
    with pytest.raises(FormatError, match="outside the file"):
        load_elf(GuestMemory.for_tests(1 << 20), image)
