"""Guest memory: regions, translation and the bounds every guest-supplied address meets."""

from __future__ import annotations

import pytest

from emulator.memory import GuestMemory, GuestMemoryError, MemoryRegion


def test_accessors_round_trip() -> None:
    memory = GuestMemory.for_tests(0x10000)
    memory.write_u16(0x10, 0xBEEF)
    memory.write_u32(0x20, 0xDEADBEEF)
    memory.write_u64(0x30, 0x0123456789ABCDEF)
    memory.write(0x40, b"hello")
    assert memory.read_u16(0x10) == 0xBEEF
    assert memory.read_u32(0x20) == 0xDEADBEEF
    assert memory.read_u64(0x30) == 0x0123456789ABCDEF
    assert memory.read(0x40, 5) == b"hello"
    memory.fill(0x40, 3, 0xAA)
    assert memory.read(0x40, 5) == b"\xaa\xaa\xaalo"


@pytest.mark.parametrize(("gpa", "length"), [(0xFFFF, 2), (0x10000, 1), (-1, 1), (0, 0x10001),
                                              (0x8000, -1)])
def test_out_of_ram_is_refused(gpa: int, length: int) -> None:
    memory = GuestMemory.for_tests(0x10000)
    assert not memory.contains(gpa, length)
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)


def test_two_regions_and_the_hole_between() -> None:
    memory = GuestMemory([MemoryRegion(0, 0x1000, bytearray(0x1000)),
                          MemoryRegion(0x4000, 0x1000, bytearray(0x1000))])
    assert memory.size == 0x2000
    memory.write(0x4FF0, b"x" * 16)
    assert memory.contains(0x0, 0x1000)
    # A range may not straddle the hole, nor touch it.
    assert not memory.contains(0xFF0, 0x20)
    assert not memory.contains(0x2000, 1)


def test_overlapping_regions_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        GuestMemory([MemoryRegion(0, 0x2000, bytearray(0x2000)),
                     MemoryRegion(0x1000, 0x1000, bytearray(0x1000))])


def test_anonymous_memory_has_a_host_address() -> None:
    memory = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        assert memory.regions[0].host_address != 0
        memory.write_u32(0x1000, 7)
        assert memory.read_u32(0x1000) == 7
    finally:
        memory.close()
