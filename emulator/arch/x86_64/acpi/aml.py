"""A small AML encoder: just what a DSDT describing fixed devices needs (ACPI 6.5 section 20,
"ACPI Machine Language Specification", and 6.4, "Resource Data Types for ACPI").

Every function returns the encoded bytes of one term, so a namespace is written as nested
calls, as ASL is::

    scope("\\\\_SB_", device("VR00", name("_HID", string("LNRO0005")), ...))

Only static data objects are encoded (Name, Scope, Device, integers, strings, buffers and
resource templates); no methods, no operators: the tables describe hardware that does not
change while the guest runs.
"""

from __future__ import annotations

import struct

__all__ = [
    "buffer",
    "device",
    "eisa_id",
    "extended_interrupt",
    "integer",
    "io",
    "memory32_fixed",
    "name",
    "name_string",
    "pkg_length",
    "resource_template",
    "scope",
    "string",
]

# Opcodes and prefixes (ACPI 6.5 section 20.2).
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
ROOT_CHAR = 0x5C
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX

# Resource descriptor tags (ACPI 6.5 section 6.4).
IO_TAG = 0x47  # small item 0x08, length 7
END_TAG = 0x79  # small item 0x0F, length 1
MEMORY32_FIXED_TAG = 0x86  # large item 0x06
EXTENDED_INTERRUPT_TAG = 0x89  # large item 0x09

#: Largest PkgLength: four bytes carry 4 + 3 * 8 bits.
PKG_LENGTH_MAX = (1 << 28) - 1


def pkg_length(body_length: int) -> bytes:
    """The PkgLength of a package whose contents after the PkgLength are ``body_length``
    bytes: the encoded value counts its own bytes too (20.2.4), one byte up to 63, else a lead
    byte with the byte count in bits 7-6 and the low nibble in bits 3-0, then the rest."""
    if body_length < 0:
        raise ValueError("negative package length")
    if body_length + 1 < 0x40:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"package of {body_length} bytes is too long for a PkgLength")


def _name_seg(seg: str) -> bytes:
    """A NameSeg: four characters, A-Z or _ first, then A-Z, 0-9 or _, padded with _."""
    if not 1 <= len(seg) <= 4:
        raise ValueError(f"AML name segment {seg!r} is not 1 to 4 characters")
    seg = seg.ljust(4, "_")
    if not (seg[0].isascii() and (seg[0].isupper() or seg[0] == "_")) or not all(
            c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in seg):
        raise ValueError(f"AML name segment {seg!r} has characters outside A-Z, 0-9, _")
    return seg.encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: an optional root prefix ``\\``, then segments separated by dots."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    segs = [_name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\0"  # NullName: the root itself
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError("AML name path of more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest integer encoding: ZeroOp, OneOp, or a byte/word/dword/qword constant."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 0xFF), (WORD_PREFIX, "<H", 0xFFFF),
                               (DWORD_PREFIX, "<I", 0xFFFF_FFFF),
                               (QWORD_PREFIX, "<Q", 0xFFFF_FFFF_FFFF_FFFF)):
        if 0 <= value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value} out of range")


def string(value: str) -> bytes:
    """A String constant: ASCII, NUL-terminated."""
    raw = value.encode("ascii")
    if b"\0" in raw:
        raise ValueError("AML string with a NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(value: str) -> bytes:
    """``EisaId("PNP0501")``: three letters and four hex digits compressed into a dword, the
    form _HID takes for PNP IDs (ACPI 6.5 section 19.6.35; the letters are 5 bits each)."""
    if (len(value) != 7 or not value[:3].isascii() or not value[:3].isupper()
            or not value[:3].isalpha()):
        raise ValueError(f"EISA ID {value!r} is not three capital letters and four hex digits")
    try:
        product = int(value[3:], 16)
    except ValueError:
        raise ValueError(f"EISA ID {value!r} is not three capital letters and four hex digits") \
            from None
    letters = [ord(c) - 0x40 for c in value[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    # Stored big-endian: vendor in the first two bytes, product in the next two.
    raw = struct.pack(">HH", vendor, product)
    return integer(int.from_bytes(raw, "little"))


def name(path: str, value: bytes) -> bytes:
    """``Name(path, value)`` where ``value`` is an encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """``Scope(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """``Device(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """``Buffer() { data }``: the size as an integer, then the bytes."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate() { descriptors }``: a buffer closed by an end tag whose checksum
    byte is 0 ("treat as correct", as iasl writes it)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """``Memory32Fixed(ReadWrite, base, length)`` (6.4.3.4)."""
    if not (0 <= base <= 0xFFFF_FFFF and 0 <= length <= 0xFFFF_FFFF
            and base + length <= 1 << 32):
        raise ValueError(f"memory window {base:#x}+{length:#x} is not below 4 GiB")
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, int(writable), base, length)


def extended_interrupt(gsi: int, *, edge: bool = True, active_low: bool = False,
                       shared: bool = False) -> bytes:
    """``Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared)
    {gsi}`` (6.4.3.6), one interrupt number."""
    if not 0 <= gsi <= 0xFFFF_FFFF:
        raise ValueError(f"interrupt {gsi} out of range")
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0) | (0x08 if shared else 0)
    # Length after the 3-byte header: flags, count, one dword.
    return struct.pack("<BHBBI", EXTENDED_INTERRUPT_TAG, 6, flags, 1, gsi)


def io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """``IO(Decode16, minimum, maximum, alignment, length)`` (6.4.2.5)."""
    if not (0 <= minimum <= maximum <= 0xFFFF and 0 <= alignment <= 0xFF
            and 0 <= length <= 0xFF):
        raise ValueError(f"I/O range {minimum:#x}-{maximum:#x}/{length} out of range")
    return struct.pack("<BBHHBB", IO_TAG, 1, minimum, maximum, alignment, length)
