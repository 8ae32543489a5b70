"""The AML encoder, checked against encodings from the specification and iasl's output."""

from __future__ import annotations

import pytest

from emulator.arch.x86_64.acpi import aml


@pytest.mark.parametrize(("length", "encoded"), [
    (0, b"\x01"),
    (62, b"\x3f"),
    # Two bytes from 63 on: the encoded value counts both PkgLength bytes.
    (63, bytes([0x40 | (65 & 0xF), 65 >> 4])),
    (0xFFD, bytes([0x4F, 0xFF])),
    # Three bytes past 12 bits, four past 20.
    (0xFFE, bytes([0x80 | 1, 0x00, 0x01])),
    (0x10_0000, bytes([0xC0 | 4, 0x00, 0x00, 0x01])),
])
def test_pkg_length(length: int, encoded: bytes) -> None:
    assert aml.pkg_length(length) == encoded


def test_pkg_length_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="too long"):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"), (0x1_0000, b"\x0c\x00\x00\x01\x00"),
    (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
])
def test_integer(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


def test_names() -> None:
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("_SB") == b"_SB_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.VR00") == b"\\\x2e_SB_VR00"
    assert aml.name_string("\\A.B.C") == b"\\\x2f\x03A___B___C___"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("TOOLONG", "0ABC", "a", "A-B", "A..B"):
        with pytest.raises(ValueError, match="name segment"):
            aml.name_string(bad)


def test_eisa_id() -> None:
    # iasl: EisaId ("PNP0501") is 0x0105D041, EisaId ("PNP0A03") 0x030AD041.
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    for bad in ("PNP050", "pnp0501", "PNP05G1", "1NP0501"):
        with pytest.raises(ValueError, match="EISA ID"):
            aml.eisa_id(bad)


def test_string() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    with pytest.raises(ValueError, match="NUL"):
        aml.string("a\0b")


def test_resource_descriptors_as_iasl_writes_them() -> None:
    # Bytes from iasl 20200925 for the same ASL.
    assert aml.memory32_fixed(0xD000_0000, 0x1000) == bytes.fromhex("86090001000000d000100000")
    assert aml.extended_interrupt(5) == bytes.fromhex("8906000301050000 00".replace(" ", ""))
    assert aml.extended_interrupt(16, edge=False, active_low=True, shared=True) == \
        bytes.fromhex("890600 0d01 10000000".replace(" ", ""))
    assert aml.io(0x3F8, 0x3F8, 1, 8) == bytes.fromhex("4701f803f8030108")
    assert aml.resource_template() == b"\x11\x05\x0a\x02\x79\x00"


def test_resource_descriptors_refuse_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="below 4 GiB"):
        aml.memory32_fixed(0xFFFF_F000, 0x2000)
    with pytest.raises(ValueError, match="I/O range"):
        aml.io(0x3F8, 0x3F0, 1, 8)
    with pytest.raises(ValueError, match="interrupt"):
        aml.extended_interrupt(-1)


def test_device_in_scope() -> None:
    dev = aml.device("VR00", aml.name("_UID", aml.integer(0)))
    assert dev == b"\x5b\x82\x0b" + b"VR00" + b"\x08_UID\x00"
    assert aml.scope("_SB_", dev) == b"\x10" + bytes([1 + 4 + len(dev)]) + b"_SB_" + dev
