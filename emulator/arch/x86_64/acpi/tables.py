"""The ACPI tables' binary layouts and checksums (ACPI 6.5 section 5.2): the root pointer
(RSDP), the common table header, XSDT, FADT, MADT, and the DSDT around its AML.

Only what a hardware-reduced virtual machine without PCI needs, as Firecracker's
``acpi_tables`` crate: no FACS (no firmware waking vector, no global lock), no PM blocks, no
SCI. Offsets are the specification's; the builders take every address from the caller.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = [
    "CREATOR_ID",
    "OEM_ID",
    "OEM_TABLE_ID",
    "checksum",
    "dsdt",
    "fadt",
    "madt",
    "rsdp",
    "xsdt",
]

#: Who made the tables, in every header (ACPI IDs are upper-case ASCII).
OEM_ID = b"VDSKFS"
OEM_TABLE_ID = b"VDISKFS "
OEM_REVISION = 1
CREATOR_ID = b"VDFS"
CREATOR_REVISION = 1

#: The common header: signature, length, revision, checksum, OEM ID, OEM table ID, OEM
#: revision, creator ID, creator revision (5.2.6).
HEADER = struct.Struct("<4sIBB6s8sI4sI")
HEADER_SIZE = HEADER.size  # 36
#: Offset of the checksum byte in the header and in the RSDP.
HEADER_CHECKSUM_OFFSET = 9
RSDP_CHECKSUM_OFFSET = 8
RSDP_EXTENDED_CHECKSUM_OFFSET = 32

#: RSDP (5.2.5.3): signature, checksum (first 20 bytes), OEM ID, revision, RSDT address,
#: length, XSDT address, extended checksum (all 36 bytes), 3 reserved.
RSDP = struct.Struct("<8sB6sBIIQB3x")
RSDP_SIGNATURE = b"RSD PTR "
#: ACPI 2.0 and later: the XSDT exists and the extended checksum covers the whole structure.
RSDP_REVISION = 2
RSDP_V1_SIZE = 20

XSDT_REVISION = 1
#: FADT of ACPI 6.5 (5.2.9): 276 bytes, major revision 6, minor 5.
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_SIZE = 276
FADT_DSDT_OFFSET = 40
FADT_IAPC_BOOT_ARCH_OFFSET = 109
FADT_FLAGS_OFFSET = 112
FADT_MINOR_REVISION_OFFSET = 131
FADT_X_DSDT_OFFSET = 140
#: FADT flags (table 5.10): no fixed power or sleep button, and HW_REDUCED_ACPI: no PM1/GPE
#: blocks, no SCI, no PM timer -- the kernel then sets up neither the 8259 nor the PIT path
#: (arch/x86/kernel/acpi/boot.c: acpi_generic_reduced_hw_init) and takes its interrupts
#: through the IOAPIC that the MADT describes.
FADT_PWR_BUTTON = 1 << 4
FADT_SLP_BUTTON = 1 << 5
FADT_HW_REDUCED_ACPI = 1 << 20
#: IA-PC boot architecture flags (table 5.11): no VGA, no MSI (there is no PCI); not
#: LEGACY_DEVICES and not 8042: the i8042 here only resets the machine.
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3

#: MADT of ACPI 6.5 (5.2.12): revision 6; the header is followed by the local APIC address
#: and flags, then the interrupt controller structures.
MADT_REVISION = 6
#: MADT flag: the machine also has dual 8259 PICs (KVM_CREATE_IRQCHIP makes them).
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # type 0, length 8, UID, APIC ID, flags
MADT_IO_APIC = struct.Struct("<BBBBII")  # type 1, length 12, ID, reserved, address, GSI base
MADT_INTERRUPT_OVERRIDE = struct.Struct("<BBBBIH")  # type 2, length 10, bus, source, GSI, flags
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_OVERRIDE = 2
#: Local APIC flag: the processor is enabled.
LOCAL_APIC_ENABLED = 1 << 0

#: DSDT revision 2: integers in its AML are 64-bit.
DSDT_REVISION = 2


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte at 0) sum to zero modulo 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, offset: int, end: int | None = None) -> bytes:
    """``data`` with the checksum byte at ``offset`` set over ``data[:end]``."""
    out = bytearray(data)
    out[offset] = 0
    out[offset] = checksum(bytes(out[:end]))
    return bytes(out)


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the common header, then ``body``, checksummed."""
    if len(signature) != 4:
        raise ValueError(f"table signature {signature!r} is not four bytes")
    header = HEADER.pack(signature, HEADER_SIZE + len(body), revision, 0, OEM_ID, OEM_TABLE_ID,
                         OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    return _with_checksum(header + body, HEADER_CHECKSUM_OFFSET)


def rsdp(xsdt_address: int) -> bytes:
    """The root pointer (revision 2): no RSDT, the XSDT at ``xsdt_address``; both
    checksums, the ACPI 1.0 one over the first 20 bytes and the extended one over all."""
    raw = RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP.size, xsdt_address, 0)
    raw = _with_checksum(raw, RSDP_CHECKSUM_OFFSET, RSDP_V1_SIZE)
    return _with_checksum(raw, RSDP_EXTENDED_CHECKSUM_OFFSET)


def xsdt(entries: Sequence[int]) -> bytes:
    """The extended root table: the 64-bit addresses of the other tables (not the DSDT,
    which the FADT points to)."""
    return table(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in entries))


def fadt(dsdt_address: int) -> bytes:
    """A hardware-reduced FADT pointing at the DSDT through X_DSDT (the 32-bit DSDT field
    stays 0, as the specification asks when X_DSDT is used); every PM block, the SCI and the
    FACS are absent."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, value)

    put("<H", FADT_IAPC_BOOT_ARCH_OFFSET, IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED)
    put("<I", FADT_FLAGS_OFFSET, FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put("<B", FADT_MINOR_REVISION_OFFSET, FADT_MINOR_REVISION)
    put("<Q", FADT_X_DSDT_OFFSET, dsdt_address)
    return table(b"FACP", FADT_REVISION, bytes(body))


def madt(local_apic_address: int, apic_ids: Sequence[int], io_apic_id: int,
         io_apic_address: int, overrides: Sequence[tuple[int, int, int]] = ()) -> bytes:
    """The interrupt controllers: one enabled local APIC per vCPU (processor UID = index),
    one I/O APIC whose pins start at GSI 0, then ``(source, gsi, flags)`` interrupt source
    overrides for ISA lines that are not wired to the pin of their number."""
    body = bytearray(struct.pack("<II", local_apic_address, MADT_PCAT_COMPAT))
    for uid, apic_id in enumerate(apic_ids):
        body += MADT_LOCAL_APIC.pack(MADT_TYPE_LOCAL_APIC, MADT_LOCAL_APIC.size, uid, apic_id,
                                     LOCAL_APIC_ENABLED)
    body += MADT_IO_APIC.pack(MADT_TYPE_IO_APIC, MADT_IO_APIC.size, io_apic_id, 0,
                              io_apic_address, 0)
    for source, gsi, flags in overrides:
        body += MADT_INTERRUPT_OVERRIDE.pack(MADT_TYPE_INTERRUPT_OVERRIDE,
                                             MADT_INTERRUPT_OVERRIDE.size, 0, source, gsi, flags)
    return table(b"APIC", MADT_REVISION, bytes(body))


def dsdt(aml: bytes) -> bytes:
    """The differentiated system description table: the header, then the AML definition
    block."""
    return table(b"DSDT", DSDT_REVISION, aml)
