"""CRC-32C (Castagnoli), the checksum of VHDX headers, region tables and log entries.

Pure Python, table driven (one table lookup per byte), so vdiskfs needs no compiled
dependency: about 10 ms for the 64 KiB region table, the largest structure checked on every
open. Log entries are checked only when a log needs replaying, which is rare.

``crc32c(data)`` is the standard CRC-32C (reflected polynomial 0x82F63B78, initial value and
final XOR 0xFFFFFFFF): ``crc32c(b"123456789") == 0xE3069283``. VHDX computes it over a
structure whose checksum field is zeroed; :func:`crc32c_zeroed` does that without copying the
buffer.
"""

from __future__ import annotations

__all__ = ["crc32c", "crc32c_zeroed"]

_POLY = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def _update(crc: int, data: bytes | bytearray | memoryview) -> int:
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    return _update(crc ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


def crc32c_zeroed(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    """CRC-32C of ``data`` with the 4-byte checksum field at ``field_offset`` read as zeros."""
    view = memoryview(data)
    crc = _update(0xFFFFFFFF, view[:field_offset])
    crc = _update(crc, b"\0\0\0\0")
    crc = _update(crc, view[field_offset + 4 :])
    return crc ^ 0xFFFFFFFF
