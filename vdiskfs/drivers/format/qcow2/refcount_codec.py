"""Refcount entries in a refcount block's bytes, 1 to 64 bits wide: the pure part of
:mod:`.refcount` (QEMU's ``get_refcount_ro0``..``ro6`` and ``set_refcount_ro0``..``ro6``).

* 1, 2 and 4 bits: packed into bytes, least significant bits first;
* 8, 16, 32 and 64 bits: big-endian integers.
"""

from __future__ import annotations

import sys
from array import array

__all__ = ["RefcountCodec"]

_SWAP = sys.byteorder == "little"


def _has_free_field_table(bits: int) -> bytes:
    """For sub-byte widths: byte value -> 1 if one of its fields is zero (a free entry)."""
    mask = (1 << bits) - 1
    out = bytearray(256)
    for value in range(256):
        out[value] = any((value >> shift) & mask == 0 for shift in range(0, 8, bits))
    return bytes(out)


class RefcountCodec:
    """Entries of one refcount width inside a refcount block's bytes (pure)."""

    def __init__(self, refcount_order: int, cluster_bits: int) -> None:
        if not 0 <= refcount_order <= 6:
            raise ValueError(f"refcount_order {refcount_order} out of range")
        self.order = refcount_order
        self.bits = 1 << refcount_order
        #: log2 of the entries in one block.
        self.block_bits = cluster_bits + 3 - refcount_order
        self.entries_per_block = 1 << self.block_bits
        self.max_value = (1 << self.bits) - 1
        self.width = self.bits // 8  # bytes per entry, 0 for sub-byte widths
        self._per_byte = 8 // self.bits if self.bits < 8 else 0
        self._zero_entry = bytes(self.width)
        self._free_field = _has_free_field_table(self.bits) if self.bits < 8 else b""

    def get(self, block: bytearray | bytes, index: int) -> int:
        width = self.width
        if width == 1:
            return block[index]
        if width:
            start = index * width
            return int.from_bytes(block[start : start + width], "big")
        per = self._per_byte
        return (block[index // per] >> ((index % per) * self.bits)) & self.max_value

    def set(self, block: bytearray, index: int, value: int) -> None:
        width = self.width
        if width == 1:
            block[index] = value
        elif width:
            start = index * width
            block[start : start + width] = value.to_bytes(width, "big")
        else:
            per = self._per_byte
            shift = (index % per) * self.bits
            at = index // per
            block[at] = (block[at] & ~(self.max_value << shift) & 0xFF) | (value << shift)

    def find_free(self, block: bytearray | bytes, start: int, stop: int) -> int:
        """Index of the first zero entry in ``[start, stop)``, or -1."""
        width = self.width
        if width:
            pattern = self._zero_entry
            pos = start * width
            end = stop * width
            while pos < end:
                found = block.find(pattern, pos, end)
                if found < 0:
                    return -1
                if found % width == 0:
                    return found // width
                pos = (found // width + 1) * width
            return -1
        per = self._per_byte
        index = start
        # The partial byte at the start, entry by entry.
        while index < stop and index % per:
            if self.get(block, index) == 0:
                return index
            index += 1
        if index >= stop:
            return -1
        first_byte = index // per
        last_byte = -(-stop // per)
        found = block[first_byte:last_byte].translate(self._free_field).find(1)
        if found < 0:
            return -1
        index = (first_byte + found) * per
        while index < stop:
            if self.get(block, index) == 0:
                return index
            index += 1
        return -1

    def free_run(self, block: bytearray | bytes, start: int, limit: int) -> int:
        """How many consecutive zero entries start at ``start`` (at most ``limit``)."""
        width = self.width
        if width:
            span = block[start * width : (start + limit) * width]
            nonzero = len(span) - len(span.lstrip(b"\0"))
            return min(limit, nonzero // width)
        n = 0
        while n < limit and self.get(block, start + n) == 0:
            n += 1
        return n

    def encode_block(self, values: array[int] | list[int]) -> bytearray:
        """A block's bytes from up to ``entries_per_block`` values (the rest zero)."""
        block = bytearray(self.entries_per_block * self.bits // 8)
        width = self.width
        if width in (2, 4, 8):
            packed = array({2: "H", 4: "I", 8: "Q"}[width], values)
            if packed.itemsize != width:  # 'I' is 4 bytes on every platform vdiskfs runs on
                raise RuntimeError("unexpected array item size")
            if _SWAP:
                packed.byteswap()
            raw = packed.tobytes()
            block[: len(raw)] = raw
        elif width == 1:
            block[: len(values)] = bytes(values)
        else:
            for index, value in enumerate(values):
                if value:
                    self.set(block, index, value)
        return block
