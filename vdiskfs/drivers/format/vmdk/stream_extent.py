"""Compressed sparse extents (``streamOptimized``): every grain deflated on its own, behind a
grain marker when the header says so. Read-only, as in QEMU: the node refuses a writable open.

Inflated grains are kept in the image's grain cache (:class:`~.extent.SparseShared`), each read
and inflated once however many readers miss on it together; the run executor asks for the bytes
of a COMPRESSED run through the node's ``read_compressed`` hook, which hands the run to its
extent.
"""

from __future__ import annotations

import zlib

from vdiskfs.drivers.format.runs import Run
from vdiskfs.drivers.format.vmdk.extent import read_checked
from vdiskfs.drivers.format.vmdk.sparse import GRAIN_MARKER
from vdiskfs.drivers.format.vmdk.sparse_extent import SparseExtent
from vdiskfs.errors import FormatError

__all__ = ["StreamExtent"]


class StreamExtent(SparseExtent):
    """A sparse extent whose grains are compressed."""

    async def read_compressed(self, run: Run) -> bytes:
        """The bytes of ``run`` from its inflated grain (``run.host_offset``: the grain's
        place in the extent file)."""
        grain = await self._inflated_grain(run.host_offset)
        start = (run.offset - self.guest_start) % self.geometry.grain_size
        end = start + run.length
        if end > len(grain):
            raise FormatError(
                f"compressed grain inflates to {len(grain)} bytes; {end} are needed",
                path=self.label,
                field="grain",
                offset=run.host_offset,
            )
        return grain[start:end]

    async def _inflated_grain(self, host_offset: int) -> bytes:
        # Single-flight: readers of one grain (small sequential reads, in flight together)
        # read and inflate it once.
        shared = self._shared
        grain, hit = await shared.grain_cache.load(
            (self.number, host_offset), lambda: self._read_grain(host_offset))
        if hit:
            shared.counters.grain_cache_hits += 1
        else:
            shared.counters.grain_cache_misses += 1
        return grain

    async def _read_grain(self, host_offset: int) -> bytes:
        header, file, label = self.header, self.file, self.label
        grain_size = header.grain_size
        if header.has_markers:
            marker = await read_checked(file, host_offset, GRAIN_MARKER.size, "grain marker",
                                        label)
            _lba, data_len = GRAIN_MARKER.unpack(marker)
            start = host_offset + GRAIN_MARKER.size
            # QEMU reads two grains' worth for the marker and the data; deflate of
            # incompressible data grows only slightly.
            if not 0 < data_len <= 2 * grain_size:
                raise FormatError(f"grain marker claims {data_len} compressed bytes",
                                  path=label, field="grain marker", offset=host_offset)
        else:
            start = host_offset
            data_len = min(2 * grain_size, file.size - host_offset)
        compressed = await read_checked(file, start, data_len, "compressed grain", label,
                                        field_offset=host_offset)
        self._shared.counters.compressed_bytes_read += len(compressed)
        return _inflate(compressed, grain_size, label, host_offset)


def _inflate(compressed: bytes, grain_size: int, label: str, offset: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        # max_length bounds the output: a deflate bomb stops at one grain.
        grain = inflater.decompress(compressed, grain_size)
    except zlib.error as exc:
        raise FormatError(f"compressed grain does not inflate: {exc}", path=label,
                          field="grain", offset=offset) from None
    if inflater.unconsumed_tail:
        raise FormatError(f"compressed grain inflates to more than {grain_size} bytes",
                          path=label, field="grain", offset=offset)
    if not inflater.eof:
        raise FormatError("compressed grain is truncated", path=label, field="grain",
                          offset=offset)
    return grain
