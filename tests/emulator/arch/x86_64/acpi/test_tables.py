"""The ACPI tables, read back from guest memory the way the kernel finds them: the RSDP by its
signature in the BIOS area, the XSDT from it, the FADT and MADT from the XSDT, the DSDT from
the FADT; every checksum, every field the kernel uses. iasl (acpica-tools) disassembles them
and compiles its disassembly back into the same AML."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from emulator.arch.x86_64 import acpi, layout
from emulator.arch.x86_64.acpi import tables
from emulator.memory import GuestMemory
from tests.emulator.arch.x86_64.acpi import amlparse

HEADER = struct.Struct("<4sIBB6s8sI4sI")


def _devices(count: int) -> list[acpi.MmioDevice]:
    return [acpi.MmioDevice(base, 0x1000, irq)
            for base, irq in map(layout.virtio_mmio_window, range(count))]


def _guest(count: int, vcpus: int = 1) -> tuple[GuestMemory, acpi.AcpiTables]:
    memory = GuestMemory.for_tests(2 << 20)
    built = acpi.build_tables(_devices(count), vcpus=vcpus)
    acpi.write_tables(memory, built)
    return memory, built


def _find_rsdp(memory: GuestMemory) -> int:
    """The kernel's scan (drivers/acpi/acpica/tbxfroot.c): 16-byte steps over 0xE0000-0xFFFFF."""
    for address in range(0xE0000, 0x100000, 16):
        if memory.read(address, 8) == b"RSD PTR ":
            return address
    raise AssertionError("no RSDP in the BIOS area")


def _table(memory: GuestMemory, address: int, signature: bytes) -> tuple[bytes, int]:
    """A table's bytes (checksum checked) and its revision."""
    sig, length, revision, *_ = HEADER.unpack(memory.read(address, HEADER.size))
    assert sig == signature
    data = memory.read(address, length)
    assert sum(data) % 256 == 0, f"{signature!r} checksum"
    assert data[10:16] == b"VDSKFS"
    return data, revision


def _walk(memory: GuestMemory) -> dict[bytes, tuple[bytes, int]]:
    rsdp = memory.read(_find_rsdp(memory), 36)
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    _, _, _, revision, rsdt, length, xsdt_address, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert (revision, rsdt, length) == (2, 0, 36)
    found = {b"XSDT": _table(memory, xsdt_address, b"XSDT")}
    xsdt = found[b"XSDT"][0]
    for (address,) in struct.iter_unpack("<Q", xsdt[36:]):
        signature = memory.read(address, 4)
        found[signature] = _table(memory, address, signature)
    fadt = found[b"FACP"][0]
    assert struct.unpack_from("<I", fadt, 40)[0] == 0  # 32-bit DSDT unused
    found[b"DSDT"] = _table(memory, struct.unpack_from("<Q", fadt, 140)[0], b"DSDT")
    return found


def test_the_kernel_finds_every_table() -> None:
    memory, built = _guest(3)
    assert _find_rsdp(memory) == built.rsdp_address == layout.ACPI_RSDP_START
    found = _walk(memory)
    assert sorted(found) == [b"APIC", b"DSDT", b"FACP", b"XSDT"]
    for _, address, data in built.tables:
        assert address >= layout.ACPI_RSDP_START
        assert address + len(data) <= layout.ACPI_TABLES_END
    # No table overlaps another.
    spans = sorted((a, a + len(d)) for _, a, d in built.tables)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_fadt_is_hardware_reduced_acpi_6() -> None:
    fadt, revision = _walk(_guest(1)[0])[b"FACP"]
    assert len(fadt) == 276 and revision == 6 and fadt[131] == 5
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20)  # HW_REDUCED_ACPI
    # No SCI, no SMI command port, no PM1/PM2/PM timer/GPE blocks, no FACS.
    assert struct.unpack_from("<IHI", fadt, 36)[0] == 0
    assert struct.unpack_from("<H", fadt, 46)[0] == 0
    assert fadt[48:96] == bytes(48)
    assert fadt[148:244] == bytes(96)
    assert struct.unpack_from("<Q", fadt, 132)[0] == 0


@pytest.mark.parametrize("vcpus", [1, 2])
def test_madt_has_a_local_apic_per_vcpu_and_the_io_apic(vcpus: int) -> None:
    madt, revision = _walk(_guest(1, vcpus)[0])[b"APIC"]
    assert revision == 6
    local_apic, flags = struct.unpack_from("<II", madt, 36)
    assert local_apic == layout.APIC_START and flags == 1  # PCAT_COMPAT: KVM has the 8259s
    entries: list[tuple[int, bytes]] = []
    pos = 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        entries.append((kind, madt[pos + 2:pos + length]))
        pos += length
    assert pos == len(madt)
    lapics = [struct.unpack("<BBI", body) for kind, body in entries if kind == 0]
    assert lapics == [(i, i, 1) for i in range(vcpus)]
    ioapics = [struct.unpack("<BBII", body) for kind, body in entries if kind == 1]
    assert ioapics == [(0, 0, layout.IOAPIC_START, 0)]
    # KVM routes GSI n to pin n: no interrupt source overrides.
    assert [kind for kind, _ in entries if kind not in (0, 1)] == []


def test_dsdt_describes_the_serial_port_and_every_virtio_device() -> None:
    devices = _devices(12)
    dsdt, revision = _walk(_guest(12)[0])[b"DSDT"]
    assert revision == 2
    (sb,) = amlparse.parse(dsdt[36:])
    assert (sb.kind, sb.name) == ("scope", "_SB_")
    com1, *virtio = sb.children
    assert (com1.kind, com1.name, com1.names["_HID"], com1.names["_UID"]) == (
        "device", "COM1", 0x0105D041, 0)  # EisaId("PNP0501")
    assert amlparse.resources(com1.names["_CRS"]) == [
        ("io", (0x3F8, 0x3F8, 1, 8)), ("irq", (0x03, [4]))]
    assert len(virtio) == 12
    for index, (node, dev) in enumerate(zip(virtio, devices, strict=True)):
        assert node.name == f"VR{index:02d}"
        assert node.names["_HID"] == "LNRO0005" and node.names["_UID"] == index
        # Consumer, edge-triggered, active-high, exclusive.
        assert amlparse.resources(node.names["_CRS"]) == [
            ("mem32", (1, dev.base, 0x1000)), ("irq", (0x03, [dev.irq]))]


def test_twelve_disks_and_more_get_distinct_windows_and_interrupts() -> None:
    windows = [layout.virtio_mmio_window(i) for i in range(len(layout.VIRTIO_IRQS))]
    assert len(windows) >= 12
    irqs = [irq for _, irq in windows]
    assert len(set(irqs)) == len(irqs)
    assert all(irq < layout.IOAPIC_PINS for irq in irqs)
    assert not {0, 1, 2, 4, 8, 13} & set(irqs)  # PIT, i8042, cascade, COM1, RTC, FPU
    assert all(irq < 16 for irq in irqs[:layout.VIRTIO_ISA_IRQ_COUNT])
    bases = [base for base, _ in windows]
    assert bases[-1] + 0x1000 <= layout.IOAPIC_START
    with pytest.raises(ValueError, match="not an I/O APIC pin"):
        acpi.build_tables([acpi.MmioDevice(0xD000_0000, 0x1000, layout.IOAPIC_PINS)])


def test_checksum() -> None:
    assert tables.checksum(b"") == 0
    assert tables.checksum(b"\x01\x02") == 0xFD
    data = b"\x10\x20\x30"
    assert (sum(data) + tables.checksum(data)) % 256 == 0


@pytest.mark.skipif(shutil.which("iasl") is None, reason="needs iasl (acpica-tools)")
def test_iasl_disassembles_and_recompiles_the_tables(tmp_path: Path) -> None:
    built = acpi.build_tables(_devices(12))
    for signature in ("DSDT", "FACP", "APIC", "XSDT"):
        raw = tmp_path / f"{signature.lower()}.dat"
        raw.write_bytes(built.by_signature(signature))
        proc = subprocess.run(["iasl", "-d", str(raw)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        text = raw.with_suffix(".dsl").read_text()
        assert "**** " not in text and "Error" not in proc.stdout, text
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert dsl.count('Name (_HID, "LNRO0005")') == 12
    assert 'EisaId ("PNP0501")' in dsl
    assert "Memory32Fixed (ReadWrite,\n                    0xD000B000," in dsl
    # Compiled back, the disassembly gives the same AML (the header differs: iasl's own
    # compiler ID).
    proc = subprocess.run(["iasl", "-p", str(tmp_path / "again"), str(tmp_path / "dsdt.dsl")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "again.aml").read_bytes()[36:] == built.by_signature("DSDT")[36:]
    facp = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in facp
