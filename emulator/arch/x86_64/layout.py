"""Every guest-physical address the VMM uses, each with what it is for (as Firecracker's
``arch/x86_64/layout.rs``). Low memory holds the boot structures; the kernel loads at its own
physical address (16 MiB for a default x86_64 kernel); MMIO devices sit in the 32-bit hole.
"""

from __future__ import annotations

# -- low memory: the structures the 64-bit boot protocol needs ---------------------------------

#: BIOS data area word the kernel writes before a reset: 0x1234 means a warm reboot, which the
#: command line asks for on panic (``reboot=panic_warm``) so the VMM can tell the two apart.
BDA_RESET_FLAG = 0x472
#: Global descriptor table used at entry (flat 64-bit code and data).
BOOT_GDT_START = 0x500
#: Interrupt descriptor table at entry: empty (interrupts stay off until the kernel has its own).
BOOT_IDT_START = 0x520
#: The boot_params "zero page" handed to the kernel in RSI.
ZERO_PAGE_START = 0x7000
#: Top of the stack at entry (grows down, below the page tables).
BOOT_STACK_POINTER = 0x8FF0
#: Level-4 page table of the identity map used at entry.
PML4_START = 0x9000
#: Page-directory-pointer table of the identity map.
PDPTE_START = 0xA000
#: Four page directories of 2 MiB pages: the identity map covers the first 4 GiB.
PDE_START = 0xB000
#: How many page directories (1 GiB each) the entry identity map has.
PDE_COUNT = 4
#: The kernel command line, NUL-terminated.
CMDLINE_START = 0x20000
#: Most bytes of command line the VMM writes (x86 COMMAND_LINE_SIZE is 2048; a bzImage may
#: declare more in its setup header).
CMDLINE_MAX_SIZE = 0x10000
#: Start of the extended BIOS data area: RAM below it is usable low memory.
EBDA_START = 0x9FC00
#: The ACPI root pointer (RSDP): in the BIOS area 0xE0000-0xFFFFF, on a 16-byte boundary, where
#: a kernel that is not told its address (``boot_params.acpi_rsdp_addr``) scans for it.
ACPI_RSDP_START = 0xE0000
#: The ACPI tables the RSDP leads to (XSDT, FADT, MADT, DSDT), up to ACPI_TABLES_END: not RAM in
#: the e820 map, so the kernel maps them and never allocates over them.
ACPI_TABLES_START = 0xE0100
ACPI_TABLES_END = 0x100000
#: First byte above the real-mode area and ROMs: "high memory" for the e820 map.
HIMEM_START = 0x100000

# -- the 32-bit hole --------------------------------------------------------------------------

#: Start of the MMIO hole below 4 GiB; guest RAM beyond this address continues at 4 GiB.
MMIO_HOLE_START = 0xD000_0000
#: First address above 4 GiB, where RAM continues past the hole.
HIGH_RAM_START = 1 << 32
#: First virtio-mmio device window; each next one is VIRTIO_MMIO_STRIDE further.
VIRTIO_MMIO_START = 0xD000_0000
#: Size of (and distance between) virtio-mmio windows.
VIRTIO_MMIO_STRIDE = 0x1000
#: IOAPIC registers (the in-kernel IOAPIC of KVM_CREATE_IRQCHIP; the MADT announces it, a
#: kernel without ACPI never uses it).
IOAPIC_START = 0xFEC0_0000
#: Input pins of KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS); GSI n is pin n.
IOAPIC_PINS = 24
#: Local APIC registers (in-kernel).
APIC_START = 0xFEE0_0000
#: Three pages KVM needs for the TSS of real-mode emulation on Intel (KVM_SET_TSS_ADDR).
KVM_TSS_ADDRESS = 0xFFFB_D000
#: One page for the EPT identity map on Intel (KVM_SET_IDENTITY_MAP_ADDR), below the TSS.
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000

# -- legacy devices ---------------------------------------------------------------------------

#: COM1 8250 UART: eight ports at 0x3f8, interrupt 4.
SERIAL_PORT = 0x3F8
SERIAL_PORT_COUNT = 8
SERIAL_IRQ = 4
#: i8042 keyboard controller: data 0x60 and command/status 0x64 (only reset is used).
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
#: CMOS / RTC index and data ports.
CMOS_PORT = 0x70
CMOS_PORT_COUNT = 2
#: Interrupt lines the virtio-mmio devices get, in order: ISA lines no legacy device here uses
#: (0: PIT, 2: PIC cascade, 4: COM1, 8: RTC, 13: FPU), then the IOAPIC's pins above the ISA
#: range. KVM's default routing wires GSI n to IOAPIC pin n (and, below 16, to the PIC), so a
#: kernel that reads the MADT reaches all of them; a kernel without ACPI runs its PIC in
#: virtual-wire mode and reaches only the first nine (VIRTIO_ISA_IRQ_COUNT).
VIRTIO_IRQS: tuple[int, ...] = (5, 6, 7, 9, 10, 11, 12, 14, 15, *range(16, IOAPIC_PINS))
#: How many of VIRTIO_IRQS are ISA lines (reachable without ACPI).
VIRTIO_ISA_IRQ_COUNT = 9

# -- the kernel ----------------------------------------------------------------------------------

#: Highest address an initrd may end at unless the kernel's setup header says otherwise.
INITRD_ADDR_MAX_DEFAULT = 0x37FF_FFFF

PAGE_SIZE = 0x1000
HUGE_PAGE_SIZE = 0x20_0000


def ram_regions(size: int) -> list[tuple[int, int]]:
    """``(guest_base, size)`` of guest RAM for ``size`` bytes: below the MMIO hole, and the
    remainder from 4 GiB up."""
    if size <= MMIO_HOLE_START:
        return [(0, size)]
    return [(0, MMIO_HOLE_START), (HIGH_RAM_START, size - MMIO_HOLE_START)]


def virtio_mmio_window(index: int) -> tuple[int, int]:
    """``(base, irq)`` of the ``index``-th virtio-mmio device."""
    if not 0 <= index < len(VIRTIO_IRQS):
        raise ValueError(f"at most {len(VIRTIO_IRQS)} virtio-mmio devices")
    return VIRTIO_MMIO_START + index * VIRTIO_MMIO_STRIDE, VIRTIO_IRQS[index]
