"""The boot GDT and the KVM segment registers built from it (Firecracker's ``gdt.rs``).

The Linux 64-bit boot protocol wants flat 4 GiB segments at selectors ``__BOOT_CS`` (0x10) and
``__BOOT_DS`` (0x18); the kernel loads its own GDT right away.
"""

from __future__ import annotations

from emulator.kvm.abi import KvmSegment

__all__ = ["BOOT_GDT", "CODE_SELECTOR", "DATA_SELECTOR", "TSS_SELECTOR", "gdt_entry",
           "segment_from_entry"]

#: 64-bit code: granularity 4 KiB, long mode, present, ring 0, execute/read, accessed.
CODE_FLAGS = 0xA09B
#: Data: granularity 4 KiB, 32-bit, present, ring 0, read/write, accessed.
DATA_FLAGS = 0xC093
#: 64-bit TSS, busy (KVM refuses a not-busy TR).
TSS_FLAGS = 0x808B


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """An 8-byte segment descriptor."""
    return (
        ((base & 0xFF00_0000) << (56 - 24))
        | ((flags & 0x0000_F0FF) << 40)
        | ((limit & 0x000F_0000) << (48 - 16))
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0x0000_FFFF)
    )


#: Null, null, __BOOT_CS, __BOOT_DS, TSS.
BOOT_GDT: tuple[int, ...] = (
    0,
    0,
    gdt_entry(CODE_FLAGS, 0, 0xFFFFF),
    gdt_entry(DATA_FLAGS, 0, 0xFFFFF),
    gdt_entry(TSS_FLAGS, 0, 0xFFFFF),
)
CODE_SELECTOR = 2 * 8
DATA_SELECTOR = 3 * 8
TSS_SELECTOR = 4 * 8


def segment_from_entry(entry: int, selector: int) -> KvmSegment:
    """The KVM view of a descriptor loaded into a segment register."""
    granular = (entry >> 55) & 1
    limit = ((entry >> 32) & 0x000F_0000) | (entry & 0x0000_FFFF)
    if granular:
        limit = (limit << 12) | 0xFFF
    present = (entry >> 47) & 1
    return KvmSegment(
        base=((entry >> 16) & 0x00FF_FFFF) | ((entry >> 32) & 0xFF00_0000),
        limit=limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        present=present,
        dpl=(entry >> 45) & 0x3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=granular,
        avl=(entry >> 52) & 1,
        unusable=0 if present else 1,
    )
