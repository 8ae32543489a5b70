"""The boot GDT, the identity page tables and the guest-physical layout."""

from __future__ import annotations

import pytest

from emulator.arch.x86_64 import gdt, layout
from emulator.arch.x86_64.regs import setup_page_tables
from emulator.memory import GuestMemory


def test_gdt_entries() -> None:
    # The descriptors every VMM uses for a flat long-mode boot (Firecracker's gdt tests).
    assert gdt.gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert gdt.gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF93000000FFFF
    assert gdt.gdt_entry(0x808B, 0, 0xFFFFF) == 0x008F8B000000FFFF


def test_segment_from_entry() -> None:
    code = gdt.segment_from_entry(gdt.BOOT_GDT[2], gdt.CODE_SELECTOR)
    assert (code.selector, code.type, code.l, code.db, code.present, code.g) == (
        0x10, 0xB, 1, 0, 1, 1)
    assert code.limit == 0xFFFFFFFF and code.base == 0
    data = gdt.segment_from_entry(gdt.BOOT_GDT[3], gdt.DATA_SELECTOR)
    assert (data.selector, data.type, data.db, data.l) == (0x18, 0x3, 1, 0)
    null = gdt.segment_from_entry(0, 0)
    assert null.unusable == 1


def test_identity_map_covers_4gib_with_huge_pages() -> None:
    memory = GuestMemory.for_tests(1 << 20)
    setup_page_tables(memory)
    assert memory.read_u64(layout.PML4_START) == layout.PDPTE_START | 3
    for gib in range(4):
        pd = memory.read_u64(layout.PDPTE_START + 8 * gib) & ~0xFFF
        assert pd == layout.PDE_START + gib * 0x1000
        # The 2 MiB page that maps the start of this GiB.
        assert memory.read_u64(pd) == (gib << 30) | 0x83
    last = memory.read_u64(layout.PDE_START + 4 * 4096 - 8)
    assert last == ((4 << 30) - (2 << 20)) | 0x83


def test_layout_constants_do_not_collide() -> None:
    low = [layout.BOOT_GDT_START, layout.BOOT_IDT_START, layout.ZERO_PAGE_START,
           layout.PML4_START, layout.PDPTE_START, layout.PDE_START, layout.CMDLINE_START]
    assert sorted(low) == low
    assert layout.PDE_START + layout.PDE_COUNT * 0x1000 <= layout.CMDLINE_START
    assert layout.BOOT_STACK_POINTER < layout.PML4_START
    assert layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE <= layout.EBDA_START
    # The ACPI tables sit in the BIOS area, outside the e820 RAM (below EBDA, from 1 MiB).
    assert layout.EBDA_START < layout.ACPI_RSDP_START < layout.ACPI_TABLES_START
    assert layout.ACPI_RSDP_START % 16 == 0
    assert layout.ACPI_TABLES_END <= layout.HIMEM_START


def test_ram_regions_and_virtio_windows() -> None:
    assert layout.ram_regions(256 << 20) == [(0, 256 << 20)]
    assert layout.ram_regions(4 << 30) == [(0, 0xD000_0000), (1 << 32, (4 << 30) - 0xD000_0000)]
    assert layout.virtio_mmio_window(0) == (0xD000_0000, 5)
    assert layout.virtio_mmio_window(1) == (0xD000_1000, 6)
    with pytest.raises(ValueError, match="at most"):
        layout.virtio_mmio_window(len(layout.VIRTIO_IRQS))
