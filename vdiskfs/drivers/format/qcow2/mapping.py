"""Guest offsets to host runs: the pure half of qcow2 reading, no I/O.

As QEMU's ``qcow2_get_host_offset`` (``block/qcow2-cluster.c``), :meth:`Geometry.next_run`
takes a guest offset, the number of bytes wanted and the decoded L2 slice that maps the offset,
and returns *one* :class:`~vdiskfs.drivers.format.runs.Run` of a single kind: data at a host
offset, zero, backing (unallocated), or compressed (``payload``: the L2 entry). A data run covers
as many clusters as lie contiguously on the host, so the format layer's executor reads them with
one request; runs never cross the end of the slice they came from.

L2 slices are decoded once, when the driver loads them, into ``array('Q')`` of native integers
(:func:`decode_table`); with extended L2 entries each guest cluster takes two words, the entry and
its subcluster bitmap.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass

from vdiskfs.drivers.format.qcow2.header import Header
from vdiskfs.drivers.format.runs import Run, RunKind
from vdiskfs.errors import FormatError

__all__ = [
    "COMPRESSED_SECTOR_SIZE",
    "L1E_OFFSET_MASK",
    "L2E_OFFSET_MASK",
    "OFLAG_COMPRESSED",
    "OFLAG_COPIED",
    "OFLAG_ZERO",
    "Geometry",
    "decode_table",
    "encode_table",
]

#: Bit 63 of L1/L2 entries: refcount exactly one (meaningful to writers only).
OFLAG_COPIED = 1 << 63
#: Bit 62 of an L2 entry: a compressed cluster descriptor.
OFLAG_COMPRESSED = 1 << 62
#: Bit 0 of a standard cluster descriptor (v3, not extended L2): the cluster reads as zeros.
OFLAG_ZERO = 1
#: Bits 9..55: the host offset of an L2 table (in an L1 entry) or of a data cluster.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: Compressed lengths count 512-byte sectors whatever the cluster size.
COMPRESSED_SECTOR_SIZE = 512
SUBCLUSTERS_PER_CLUSTER = 32
_ALL_SUBCLUSTERS = (1 << SUBCLUSTERS_PER_CLUSTER) - 1

assert array("Q").itemsize == 8, "array('Q') must hold 64-bit words"
_SWAP = sys.byteorder == "little"


def decode_table(data: bytes) -> array[int]:
    """Big-endian 64-bit table entries (an L1 table, an L2 slice) as native integers."""
    table = array("Q", data)
    if _SWAP:
        table.byteswap()
    return table


def encode_table(table: array[int]) -> bytes:
    """Native 64-bit entries (L1, L2 slice, refcount table) as big-endian bytes."""
    if not _SWAP:
        return table.tobytes()
    swapped = array("Q", table)
    swapped.byteswap()
    return swapped.tobytes()


_BACKING, _ZERO, _DATA, _COMPRESSED = (
    RunKind.BACKING, RunKind.ZERO, RunKind.DATA, RunKind.COMPRESSED,
)


@dataclass(frozen=True, slots=True)
class Geometry:
    """The mapping parameters of one image, derived from its header."""

    #: Names the image in errors.
    path: str
    cluster_bits: int
    #: log2 of guest clusters mapped by one L2 table.
    l2_bits: int
    #: log2 of guest clusters mapped by one cached L2 slice.
    slice_bits: int
    extended_l2: bool
    #: Clusters live in an external data file: host offset 0 is valid (with COPIED) and must
    #: equal the guest offset; compressed clusters are not allowed.
    has_data_file: bool
    #: Version 3 without extended L2: bit 0 of an entry is the zero flag.
    zero_flag: bool

    @classmethod
    def from_header(cls, header: Header, path: str, slice_bytes: int) -> Geometry:
        entry_bits = 4 if header.extended_l2 else 3
        slice_bytes = min(slice_bytes, header.cluster_size)
        return cls(
            path=path,
            cluster_bits=header.cluster_bits,
            l2_bits=header.cluster_bits - entry_bits,
            slice_bits=slice_bytes.bit_length() - 1 - entry_bits,
            extended_l2=header.extended_l2,
            has_data_file=header.has_data_file,
            zero_flag=header.version >= 3 and not header.extended_l2,
        )

    # -- derived sizes ----------------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def entry_size(self) -> int:
        """Bytes per L2 entry: 8, or 16 with extended L2."""
        return 16 if self.extended_l2 else 8

    @property
    def slice_entries(self) -> int:
        return 1 << self.slice_bits

    @property
    def slice_bytes(self) -> int:
        return self.slice_entries * self.entry_size

    @property
    def l2_coverage_bits(self) -> int:
        """log2 of the guest bytes that one L1 entry (one L2 table) maps."""
        return self.cluster_bits + self.l2_bits

    def slice_offset(self, l2_table_offset: int, guest_offset: int) -> int:
        """Host offset of the L2 slice that maps ``guest_offset`` within its L2 table."""
        index = (guest_offset >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
        return l2_table_offset + ((index >> self.slice_bits) << self.slice_bits) * self.entry_size

    def unmapped_run(self, offset: int, nbytes: int) -> Run:
        """The run at ``offset`` when its L1 entry is empty: to the end of that L2 table."""
        coverage = self.l2_coverage_bits
        table_end = ((offset >> coverage) + 1) << coverage
        return Run(_BACKING, offset, min(nbytes, table_end - offset))

    # -- compressed clusters ----------------------------------------------------------------------

    def compressed(self, entry: int) -> tuple[int, int]:
        """``(host_offset, stored_length)`` of a compressed cluster descriptor.

        The descriptor (x = 62 - (cluster_bits - 8)) holds the byte offset in bits 0..x-1 and the
        number of 512-byte sectors beyond the first in bits x..61; the stored length runs from
        the offset to the end of the last sector (``qcow2_parse_compressed_l2_entry``).
        """
        shift = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return host, sectors * COMPRESSED_SECTOR_SIZE - (host & (COMPRESSED_SECTOR_SIZE - 1))

    # -- the mapping ------------------------------------------------------------------------------

    def next_run(self, table: array[int], offset: int, nbytes: int) -> Run:
        """The run starting at guest ``offset`` (at most ``nbytes`` long) that ``table``, the
        decoded L2 slice mapping ``offset``, describes.

        Raises :class:`FormatError` for an entry QEMU would call corrupt.
        """
        if self.extended_l2:
            return self._next_run_extended(table, offset, nbytes)
        cluster_bits = self.cluster_bits
        cluster_mask = (1 << cluster_bits) - 1
        in_cluster = offset & cluster_mask
        index = (offset >> cluster_bits) & ((1 << self.slice_bits) - 1)
        # Clusters this request touches, but not past the end of the slice.
        last = min(self.slice_entries, index + ((in_cluster + nbytes - 1) >> cluster_bits) + 1)
        entry = table[index]

        if entry & OFLAG_COMPRESSED:
            self._check_compressed(offset)
            return Run(_COMPRESSED, offset, min(nbytes, (1 << cluster_bits) - in_cluster),
                       payload=entry)

        host = entry & L2E_OFFSET_MASK
        end = index + 1
        if entry & OFLAG_ZERO:
            if not self.zero_flag:
                raise self._corrupt(offset, "zero cluster in a version 2 image")
            while end < last and table[end] & (OFLAG_COMPRESSED | OFLAG_ZERO) == OFLAG_ZERO:
                end += 1
            kind, host_offset = _ZERO, -1
        elif not host and not (self.has_data_file and entry & OFLAG_COPIED):
            if not self.has_data_file and end < last:
                # Skip the all-zero entries at C speed: a mostly empty L2 table would otherwise
                # cost a Python loop over thousands of entries per block-status call.
                rest = memoryview(table)[end:last].tobytes()
                end += (len(rest) - len(rest.lstrip(b"\0"))) // table.itemsize
            while end < last and not self._allocated(table[end]):
                end += 1
            kind, host_offset = _BACKING, -1
        else:
            self._check_host(offset, host)
            expected = host + (1 << cluster_bits)
            while end < last:
                following = table[end]
                if (
                    following & (OFLAG_COMPRESSED | OFLAG_ZERO)
                    or following & L2E_OFFSET_MASK != expected
                ):
                    break
                end += 1
                expected += 1 << cluster_bits
            kind, host_offset = _DATA, host + in_cluster
        return Run(kind, offset, min(nbytes, ((end - index) << cluster_bits) - in_cluster),
                   host_offset)

    def _allocated(self, entry: int) -> bool:
        """Whether a standard entry is anything but "unallocated" (for run counting)."""
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO | L2E_OFFSET_MASK):
            return True
        return self.has_data_file and bool(entry & OFLAG_COPIED)

    def _next_run_extended(self, table: array[int], offset: int, nbytes: int) -> Run:
        """:meth:`next_run` for extended L2 entries: 32 subclusters per cluster, each allocated,
        zero, or unallocated (``qcow2_get_subcluster_type``)."""
        cluster_bits = self.cluster_bits
        sc_bits = cluster_bits - 5
        in_cluster = offset & ((1 << cluster_bits) - 1)
        index = (offset >> cluster_bits) & ((1 << self.slice_bits) - 1)
        entry = table[2 * index]
        if entry & OFLAG_COMPRESSED:
            self._check_compressed(offset)
            return Run(_COMPRESSED, offset, min(nbytes, (1 << cluster_bits) - in_cluster),
                       payload=entry)

        kind, mask, host = self._classify_subclusters(offset, entry, table[2 * index + 1],
                                                      in_cluster >> sc_bits)
        sc = in_cluster >> sc_bits
        run = _trailing_ones(mask >> sc)
        length = ((sc + run) << sc_bits) - in_cluster
        if sc + run == SUBCLUSTERS_PER_CLUSTER and length < nbytes:
            # The run fills the rest of this cluster: it continues into the next clusters of
            # the slice while they start with subclusters of the same kind (and, for data,
            # lie right after it on the host).
            expected = host + (1 << cluster_bits)
            for following in range(index + 1, self.slice_entries):
                next_entry = table[2 * following]
                if next_entry & OFLAG_COMPRESSED:
                    break
                try:
                    next_kind, next_mask, next_host = self._classify_subclusters(
                        offset + length, next_entry, table[2 * following + 1], 0
                    )
                except FormatError:
                    break  # reported when a read reaches that cluster
                if next_kind is not kind or (kind is _DATA and next_host != expected):
                    break
                run = _trailing_ones(next_mask)
                length += run << sc_bits
                if run < SUBCLUSTERS_PER_CLUSTER or length >= nbytes:
                    break
                expected += 1 << cluster_bits
        host_offset = host + in_cluster if kind is _DATA else -1
        return Run(kind, offset, min(nbytes, length), host_offset)

    def _classify_subclusters(self, offset: int, entry: int, bitmap: int,
                              sc: int) -> tuple[RunKind, int, int]:
        """Kind of subcluster ``sc``, the bitmask of the cluster's subclusters of that kind,
        and the cluster's host offset."""
        host = entry & L2E_OFFSET_MASK
        allocated = bitmap & _ALL_SUBCLUSTERS
        zero = bitmap >> 32
        if host or (self.has_data_file and entry & OFLAG_COPIED):
            if allocated & zero:
                raise self._corrupt(offset, "subclusters both allocated and reading as zeros "
                                    f"(bitmap {bitmap:#018x})")
            self._check_host(offset, host)
        elif allocated:
            raise self._corrupt(offset, "allocated subclusters in an unallocated cluster "
                                f"(bitmap {bitmap:#018x})")
        bit = 1 << sc
        if zero & bit:
            return _ZERO, zero, host
        if allocated & bit:
            return _DATA, allocated, host
        return _BACKING, ~(allocated | zero) & _ALL_SUBCLUSTERS, host

    # -- validation -------------------------------------------------------------------------------

    def _check_host(self, offset: int, host: int) -> None:
        if host & ((1 << self.cluster_bits) - 1):
            raise self._corrupt(offset, f"data cluster offset {host:#x} is not cluster aligned")
        if self.has_data_file:
            guest_cluster = offset & ~((1 << self.cluster_bits) - 1)
            if host != guest_cluster:
                raise self._corrupt(
                    offset,
                    f"external data file cluster offset {host:#x} differs from the guest "
                    f"offset {guest_cluster:#x}",
                )

    def _check_compressed(self, offset: int) -> None:
        if self.has_data_file:
            raise self._corrupt(offset, "compressed cluster in an image with an external data file")

    def _corrupt(self, offset: int, message: str) -> FormatError:
        return FormatError(f"{message} (guest offset {offset:#x})", path=self.path,
                           field="L2 entry")


def _trailing_ones(bits: int) -> int:
    """Number of consecutive set bits from bit 0."""
    return (bits ^ (bits + 1)).bit_length() - 1
