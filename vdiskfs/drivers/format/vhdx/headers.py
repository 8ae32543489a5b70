"""The VHDX header section: file identifier, the two headers, and the constants they use.

The first MiB of a VHDX file (MS-VHDX section 2.2)::

    0 KiB    file type identifier: "vhdxfile" and a UTF-16 creator string
    64 KiB   header 1 (checksummed over its first 4 KiB)
    128 KiB  header 2
    192 KiB  region table 1 (see region.py), 256 KiB region table 2

Of the two headers, the valid one (signature, CRC-32C, version 1) with the higher sequence
number is active, as QEMU's ``vhdx_parse_header`` picks it; two valid headers with one sequence
number are corrupt unless identical (Disk2VHD writes them so).

A writer updates the headers as the spec's two-header scheme intends: it writes the
*inactive* header with the next sequence number and flushes, so a torn write leaves the
previous header active (:func:`encode_header` builds the 4 KiB).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from vdiskfs.drivers.format.vhdx.crc32c import crc32c_zeroed
from vdiskfs.errors import FormatError

__all__ = [
    "HEADER_OFFSETS",
    "HEADER_SECTION_SIZE",
    "MIB",
    "SIGNATURE",
    "VhdxHeader",
    "choose_header",
    "encode_header",
]

MIB = 1 << 20
KIB = 1 << 10
SIGNATURE = b"vhdxfile"
#: The header section: file identifier, two headers, two region tables, reserved.
HEADER_SECTION_SIZE = MIB
#: Offsets of header 1 and header 2; each is checksummed over its first 4 KiB.
HEADER_OFFSETS = (64 * KIB, 128 * KIB)
HEADER_SIZE = 4 * KIB
HEADER_SIGNATURE = b"head"
NIL_GUID = uuid.UUID(int=0)

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(frozen=True, slots=True)
class VhdxHeader:
    """One of the two VHDX headers (MS-VHDX 2.2.2)."""

    signature: bytes
    checksum: int
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    #: Non-nil when the log may hold entries to replay.
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int
    #: The bytes the fields were parsed from, to compare two headers.
    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> VhdxHeader:
        (signature, checksum, sequence, file_write, data_write, log_guid, log_version, version,
         log_length, log_offset) = _HEADER.unpack_from(data)
        return cls(
            signature, checksum, sequence, uuid.UUID(bytes_le=file_write),
            uuid.UUID(bytes_le=data_write), uuid.UUID(bytes_le=log_guid), log_version, version,
            log_length, log_offset, bytes(data[: _HEADER.size]),
        )

    @property
    def has_log(self) -> bool:
        """Whether the log must be searched for entries to replay (QEMU's test)."""
        return self.log_guid != NIL_GUID and self.log_length != 0


def encode_header(header: VhdxHeader) -> bytes:
    """The 4 KiB of ``header`` as stored (reserved bytes zero), with its CRC-32C."""
    block = bytearray(HEADER_SIZE)
    _HEADER.pack_into(
        block, 0, HEADER_SIGNATURE, 0, header.sequence_number, header.file_write_guid.bytes_le,
        header.data_write_guid.bytes_le, header.log_guid.bytes_le, header.log_version,
        header.version, header.log_length, header.log_offset)
    struct.pack_into("<I", block, 4, crc32c_zeroed(block, 4))
    return bytes(block)


def header_problem(data: bytes) -> str | None:
    """Why the 4 KiB ``data`` is not a valid header, or None when it is."""
    if data[:4] != HEADER_SIGNATURE:
        return f"signature {data[:4]!r} is not {HEADER_SIGNATURE!r}"
    stored = struct.unpack_from("<I", data, 4)[0]
    computed = crc32c_zeroed(data[:HEADER_SIZE], 4)
    if stored != computed:
        return f"CRC-32C {stored:#010x} does not match the contents ({computed:#010x})"
    version = struct.unpack_from("<H", data, 66)[0]
    if version != 1:
        return f"version {version} is not 1"
    return None


def choose_header(first: bytes, second: bytes, *, label: str) -> tuple[int, VhdxHeader]:
    """Pick the active header from the 4 KiB at each header offset: ``(index, header)``."""
    candidates: list[tuple[int, VhdxHeader]] = []
    problems: list[str] = []
    for index, data in enumerate((first, second)):
        problem = header_problem(data)
        if problem is None:
            candidates.append((index, VhdxHeader.parse(data)))
        else:
            problems.append(f"header {index + 1}: {problem}")
    if not candidates:
        raise FormatError("no valid VHDX header (" + "; ".join(problems) + ")", path=label,
                          field="header")
    if len(candidates) == 1:
        return candidates[0]
    (i1, h1), (i2, h2) = candidates
    if h1.sequence_number > h2.sequence_number:
        return i1, h1
    if h2.sequence_number > h1.sequence_number:
        return i2, h2
    if h1.raw == h2.raw:
        return i1, h1
    raise FormatError(
        f"both headers are valid with sequence number {h1.sequence_number} but differ",
        path=label,
        field="header.sequence_number",
    )
