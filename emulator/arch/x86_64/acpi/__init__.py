"""ACPI tables that tell the guest what the machine has, generated from the layout module and
written into guest memory before boot (as Firecracker's ``vmm/src/acpi`` and QEMU's microvm).

What the guest finds (all under ``layout.ACPI_RSDP_START``..``layout.ACPI_TABLES_END``):

- RSDP (revision 2) at 0xE0000, where the kernel's scan of the BIOS area finds it; its address
  also goes to ``boot_params.acpi_rsdp_addr``, which the kernel reads first;
- XSDT -> FADT, MADT;
- FADT: hardware-reduced (no PM blocks, no SCI, no FACS), X_DSDT -> DSDT;
- MADT: a local APIC per vCPU and the in-kernel I/O APIC (KVM_CREATE_IRQCHIP) with its 24
  pins at GSI 0; no interrupt source overrides: KVM's default routing wires GSI n to pin n,
  the PIT's GSI 0 included, and that identity is what ACPI assumes for ISA lines without one;
- DSDT: ``\\_SB_.COM1`` (PNP0501, the 8250 at 0x3F8, IRQ 4) and ``\\_SB_.VRnn`` per virtio-mmio
  device (LNRO0005, its 4 KiB window and its interrupt, edge-triggered and active-high: the
  device signals by a pulse through an irqfd or KVM_IRQ_LINE).

A kernel built without ACPI ignores all of it and finds its disks in the command line's
``virtio_mmio.device=`` list, which the VMM keeps writing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from emulator.arch.x86_64 import layout
from emulator.arch.x86_64.acpi import aml, tables
from emulator.memory import GuestMemory

__all__ = ["AcpiTables", "MmioDevice", "build_dsdt", "build_tables", "write_tables"]

#: _HID of a virtio-mmio device (Linaro's ACPI ID, matched by drivers/virtio/virtio_mmio.c).
VIRTIO_MMIO_HID = "LNRO0005"
#: _HID of a 16550-compatible UART.
SERIAL_HID = "PNP0501"
#: APIC ID of the in-kernel I/O APIC (its ID register resets to 0, as QEMU announces it).
IO_APIC_ID = 0
#: Tables start on this boundary (the specification asks for none; 16 keeps them tidy).
TABLE_ALIGNMENT = 16


@dataclass(frozen=True)
class MmioDevice:
    """One virtio-mmio device as the DSDT describes it."""

    base: int
    size: int
    irq: int


@dataclass(frozen=True)
class AcpiTables:
    """The tables and where each goes in guest memory."""

    rsdp_address: int
    #: ``(signature, guest address, bytes)`` in placement order, the RSDP first.
    tables: tuple[tuple[str, int, bytes], ...]

    def by_signature(self, signature: str) -> bytes:
        for sig, _, data in self.tables:
            if sig == signature:
                return data
        raise KeyError(signature)


def _device_name(index: int) -> str:
    if not 0 <= index <= 99:
        raise ValueError(f"virtio-mmio device index {index} outside 0-99")
    return f"VR{index:02d}"


def build_dsdt(devices: Sequence[MmioDevice]) -> bytes:
    """The DSDT: the serial port and every virtio-mmio device under ``\\_SB_``."""
    serial = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id(SERIAL_HID)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(
            aml.io(layout.SERIAL_PORT, layout.SERIAL_PORT, 1, layout.SERIAL_PORT_COUNT),
            aml.extended_interrupt(layout.SERIAL_IRQ),
        )),
    )
    virtio = [
        aml.device(
            _device_name(index),
            aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
            aml.name("_UID", aml.integer(index)),
            aml.name("_CRS", aml.resource_template(
                aml.memory32_fixed(dev.base, dev.size),
                aml.extended_interrupt(dev.irq),
            )),
        )
        for index, dev in enumerate(devices)
    ]
    # "_SB_" relative to the root, which the definition block opens in: as iasl encodes it.
    return tables.dsdt(aml.scope("_SB_", serial, *virtio))


def _align(address: int) -> int:
    return -(-address // TABLE_ALIGNMENT) * TABLE_ALIGNMENT


def build_tables(devices: Sequence[MmioDevice], vcpus: int = 1) -> AcpiTables:
    """Every table, placed: the RSDP at ``layout.ACPI_RSDP_START``, the rest one after the
    other from ``layout.ACPI_TABLES_START``, the DSDT first (the FADT needs its address)."""
    if vcpus < 1:
        raise ValueError("a machine needs a vCPU")
    for dev in devices:
        if not 0 <= dev.irq < layout.IOAPIC_PINS:
            raise ValueError(f"interrupt {dev.irq} is not an I/O APIC pin "
                             f"(0-{layout.IOAPIC_PINS - 1})")
    placed: list[tuple[str, int, bytes]] = []
    cursor = layout.ACPI_TABLES_START

    def place(signature: str, data: bytes) -> int:
        nonlocal cursor
        address = cursor
        placed.append((signature, address, data))
        cursor = _align(address + len(data))
        return address

    dsdt_address = place("DSDT", build_dsdt(devices))
    fadt_address = place("FACP", tables.fadt(dsdt_address))
    madt_address = place("APIC", tables.madt(layout.APIC_START, range(vcpus), IO_APIC_ID,
                                             layout.IOAPIC_START))
    xsdt_address = place("XSDT", tables.xsdt([fadt_address, madt_address]))
    if cursor > layout.ACPI_TABLES_END:
        raise ValueError(f"ACPI tables of {cursor - layout.ACPI_TABLES_START} bytes do not fit "
                         f"below {layout.ACPI_TABLES_END:#x}")
    rsdp = ("RSDP", layout.ACPI_RSDP_START, tables.rsdp(xsdt_address))
    return AcpiTables(layout.ACPI_RSDP_START, (rsdp, *placed))


def write_tables(memory: GuestMemory, acpi: AcpiTables) -> None:
    """Copy the tables into guest memory at their addresses."""
    for _, address, data in acpi.tables:
        memory.write(address, data)
