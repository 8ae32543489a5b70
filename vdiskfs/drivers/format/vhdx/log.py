"""The VHDX metadata log: replayed in memory so a read-only open never writes, and written by a
writable open (MS-VHDX 2.3).

VHDX updates its metadata (BAT, metadata region) through a write-ahead log: a circular buffer
of entries, each a header, descriptors, and 4 KiB data sectors. When the active header's log
GUID is non-nil, the log may hold entries that were not yet applied to their final place, and
the spec says they must be replayed before the file is read. QEMU replays them on a writable
open and refuses a read-only one ("needs to be replayed: qemu-img check -r all").

vdiskfs replays them into memory instead: :func:`find_active_sequence` finds the entries to
replay (the valid sequence whose head has the highest sequence number, from the head's tail),
:class:`ReplayOverlay` records what they write, and :class:`LogReplayNode` -- a filter over the
file -- serves the file's bytes with the replayed sectors laid over them. Everything above it
(region table, metadata, BAT, and payload reads) sees the replayed file; the file itself is
never touched. An entry's ``last_file_offset`` can extend the file: the overlay reads as zeros
past the real end.

:func:`encode_entry` builds one entry of full 4 KiB data sectors, what the driver writes to
journal its BAT updates (see driver.py); :func:`max_data_sectors` says how many fit the log.

Bounds: the log is read whole, so a log longer than :data:`MAX_REPLAY_LOG` is refused (QEMU's
default log is 1 MiB); the descriptors of one replay are bounded by :data:`MAX_DESCRIPTORS`.
Entries may not write into the file identifier and headers (the first 192 KiB) or into the log
itself.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, FilterNode
from vdiskfs.drivers.format.vhdx.crc32c import crc32c_zeroed
from vdiskfs.drivers.format.vhdx.headers import MIB
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "MAX_REPLAY_LOG",
    "SECTOR",
    "LogEntry",
    "LogReplayNode",
    "ReplayOverlay",
    "encode_entry",
    "find_active_sequence",
    "max_data_sectors",
]

SECTOR = 4096
ENTRY_SIGNATURE = b"loge"
DATA_DESCRIPTOR = b"desc"
ZERO_DESCRIPTOR = b"zero"
DATA_SECTOR_SIGNATURE = b"data"
#: Largest log vdiskfs reads into memory to replay.
MAX_REPLAY_LOG = 64 * MIB
#: Most descriptors applied in one replay (a full 64 MiB log of 4 KiB data sectors is 16384).
MAX_DESCRIPTORS = 1 << 17
#: The file identifier and both headers: the log never updates them.
PROTECTED_PREFIX = 192 * 1024

_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
_DESCRIPTOR = struct.Struct("<4sIQQQ")
assert _ENTRY_HEADER.size == 64 and _DESCRIPTOR.size == 32


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One update of a log entry: 4 KiB of data, or ``length`` bytes of zeros."""

    file_offset: int
    length: int
    #: The 4 KiB written, or None for a zero descriptor.
    data: bytes | None


@dataclass(frozen=True, slots=True)
class LogEntry:
    position: int
    length: int
    sequence: int
    tail: int
    flushed_file_offset: int
    last_file_offset: int
    descriptors: tuple[Descriptor, ...]


def _circular(log: bytes, position: int, length: int) -> bytes:
    end = position + length
    if end <= len(log):
        return log[position:end]
    return log[position:] + log[: end - len(log)]


def _parse_entry(log: bytes, position: int, log_guid: uuid.UUID) -> LogEntry | None:
    """The valid entry at ``position`` or None (QEMU's ``vhdx_validate_log_entry``)."""
    (signature, checksum, entry_length, tail, sequence, descriptor_count, _reserved, raw_guid,
     flushed, last) = _ENTRY_HEADER.unpack_from(_circular(log, position, _ENTRY_HEADER.size))
    if (signature != ENTRY_SIGNATURE or entry_length == 0 or entry_length % SECTOR
            or entry_length > len(log) or sequence == 0
            or uuid.UUID(bytes_le=raw_guid) != log_guid or tail % SECTOR or tail >= len(log)):
        return None
    # The header takes two descriptor slots of the first sector; 128 slots per sector.
    descriptor_sectors = -(-(descriptor_count + 2) // 128)
    if descriptor_sectors * SECTOR > entry_length:
        return None
    data = _circular(log, position, entry_length)
    if crc32c_zeroed(data, 4) != checksum:
        return None
    descriptors: list[Descriptor] = []
    data_sector = descriptor_sectors
    for i in range(descriptor_count):
        (kind, trailing, leading_or_length, file_offset,
         desc_sequence) = _DESCRIPTOR.unpack_from(data, _ENTRY_HEADER.size + i * _DESCRIPTOR.size)
        if desc_sequence != sequence or file_offset % SECTOR:
            return None
        if kind == ZERO_DESCRIPTOR:
            if leading_or_length % SECTOR:
                return None
            descriptors.append(Descriptor(file_offset, leading_or_length, None))
        elif kind == DATA_DESCRIPTOR:
            start = data_sector * SECTOR
            if start + SECTOR > entry_length:
                return None
            sector = data[start : start + SECTOR]
            high, low = struct.unpack_from("<I", sector, 4)[0], struct.unpack_from(
                "<I", sector, SECTOR - 4)[0]
            if sector[:4] != DATA_SECTOR_SIGNATURE or (high << 32 | low) != sequence:
                return None
            # The data sector's first 8 and last 4 bytes hold the signature and sequence; the
            # real bytes there travel in the descriptor.
            payload = (struct.pack("<Q", leading_or_length) + sector[8 : SECTOR - 4]
                       + struct.pack("<I", trailing))
            descriptors.append(Descriptor(file_offset, SECTOR, payload))
            data_sector += 1
        else:
            return None
    return LogEntry(position, entry_length, sequence, tail, flushed, last, tuple(descriptors))


def _descriptor_sectors(count: int) -> int:
    """Sectors holding the entry header (two descriptor slots) and ``count`` descriptors."""
    return -(-(count + 2) // 128)


def max_data_sectors(log_length: int) -> int:
    """Most 4 KiB data sectors one entry can carry in a log of ``log_length`` bytes."""
    total = log_length // SECTOR
    count = max(0, total - 1)
    while count and _descriptor_sectors(count) + count > total:
        count -= 1
    return count


def encode_entry(updates: list[tuple[int, bytes]], *, sequence: int, tail: int,
                 log_guid: uuid.UUID, flushed_file_offset: int, last_file_offset: int) -> bytes:
    """One log entry writing each ``(file_offset, 4 KiB)`` of ``updates``, checksummed.

    A data sector keeps the 4 KiB minus its first 8 and last 4 bytes, which travel in the
    descriptor; their place in the sector holds the signature and the sequence number, so a
    torn entry is detected (QEMU's ``vhdx_log_raw_to_le_sector``).
    """
    count = len(updates)
    descriptor_sectors = _descriptor_sectors(count)
    entry = bytearray((descriptor_sectors + count) * SECTOR)
    _ENTRY_HEADER.pack_into(entry, 0, ENTRY_SIGNATURE, 0, len(entry), tail, sequence, count, 0,
                            log_guid.bytes_le, flushed_file_offset, last_file_offset)
    for i, (file_offset, data) in enumerate(updates):
        if len(data) != SECTOR or file_offset % SECTOR:
            raise ValueError("log updates are whole, aligned 4 KiB sectors")
        leading = struct.unpack_from("<Q", data, 0)[0]
        trailing = struct.unpack_from("<I", data, SECTOR - 4)[0]
        _DESCRIPTOR.pack_into(entry, _ENTRY_HEADER.size + i * _DESCRIPTOR.size, DATA_DESCRIPTOR,
                              trailing, leading, file_offset, sequence)
        base = (descriptor_sectors + i) * SECTOR
        entry[base : base + SECTOR] = (DATA_SECTOR_SIGNATURE + struct.pack("<I", sequence >> 32)
                                       + data[8 : SECTOR - 4]
                                       + struct.pack("<I", sequence & 0xFFFFFFFF))
    struct.pack_into("<I", entry, 4, crc32c_zeroed(entry, 4))
    return bytes(entry)


def find_active_sequence(log: bytes, log_guid: uuid.UUID) -> list[LogEntry]:
    """The entries to replay, in order: [] when the log holds none for ``log_guid``.

    Every 4 KiB position is tried as an entry (the log is circular and its start is not
    recorded). The head is the valid entry with the highest sequence number. The spec's
    sequence runs from the entry the head's ``tail`` names, through entries with consecutive
    sequence numbers, to the head. QEMU ignores ``tail`` (and writes a stale one after its
    first log flush of a session), so when the tail does not lead to the head, the sequence is
    the run of consecutive entries that ends at the head, found walking backwards.
    """
    entries: dict[int, LogEntry] = {}
    for position in range(0, len(log), SECTOR):
        entry = _parse_entry(log, position, log_guid)
        if entry is not None:
            entries[position] = entry
    if not entries:
        return []
    head = max(entries.values(), key=lambda e: e.sequence)
    forward: list[LogEntry] = []
    entry = entries.get(head.tail)
    while entry is not None and len(forward) < len(entries):
        if forward and entry.sequence != forward[-1].sequence + 1:
            break
        forward.append(entry)
        if entry is head:
            return forward
        entry = entries.get((entry.position + entry.length) % len(log))
    by_end = {(e.position + e.length) % len(log): e for e in entries.values()}
    backward = [head]
    while len(backward) < len(entries):
        previous = by_end.get(backward[-1].position)
        if previous is None or previous.sequence != backward[-1].sequence - 1:
            break
        backward.append(previous)
    backward.reverse()
    return backward


@dataclass
class ReplayOverlay:
    """What a replay writes: disjoint, sorted ``[start, end)`` intervals holding data or zeros,
    and the file size it leaves."""

    file_size: int
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    #: Data of each interval, or None for zeros.
    payloads: list[bytes | None] = field(default_factory=list)
    entries_replayed: int = 0

    @classmethod
    def replay(cls, entries: list[LogEntry], *, file_size: int, log_range: tuple[int, int],
               label: str) -> ReplayOverlay:
        overlay = cls(file_size)
        applied = 0
        log_start, log_end = log_range
        for entry in entries:
            field_name = f"log_entry[{entry.position:#x}]"
            if entry.flushed_file_offset > file_size:
                raise FormatError(
                    f"log entry {entry.sequence} was written when the file was "
                    f"{entry.flushed_file_offset} bytes; it is now {file_size}: truncated",
                    path=label, field=f"{field_name}.flushed_file_offset")
            for descriptor in entry.descriptors:
                applied += 1
                if applied > MAX_DESCRIPTORS:
                    raise UnsupportedError(
                        f"the log holds more than {MAX_DESCRIPTORS} updates to replay",
                        path=label, field="log")
                start = descriptor.file_offset
                end = start + descriptor.length
                limit = max(overlay.file_size, entry.last_file_offset)
                if (start < PROTECTED_PREFIX or end > limit
                        or (start < log_end and log_start < end)):
                    raise FormatError(
                        f"log entry {entry.sequence} writes {descriptor.length} bytes at "
                        f"{start:#x}: into the headers, the log, or past the file's end "
                        f"({limit})", path=label, field=f"{field_name}.descriptor")
                overlay._paint(start, end, descriptor.data)
            overlay.file_size = max(overlay.file_size, entry.last_file_offset)
            overlay.entries_replayed += 1
        return overlay

    def _paint(self, start: int, end: int, payload: bytes | None) -> None:
        """Lay ``[start, end)`` over the intervals, cutting the ones it covers."""
        i = bisect.bisect_right(self.ends, start)
        j = i
        keep: list[tuple[int, int, bytes | None]] = []
        while j < len(self.starts) and self.starts[j] < end:
            s, e, p = self.starts[j], self.ends[j], self.payloads[j]
            if s < start:
                keep.append((s, start, None if p is None else p[: start - s]))
            if e > end:
                keep.append((end, e, None if p is None else p[end - s :]))
            j += 1
        pieces = [piece for piece in keep if piece[1] <= start]
        pieces.append((start, end, payload))
        pieces += [piece for piece in keep if piece[0] >= end]
        self.starts[i:j] = [p[0] for p in pieces]
        self.ends[i:j] = [p[1] for p in pieces]
        self.payloads[i:j] = [p[2] for p in pieces]

    def apply(self, offset: int, buf: bytearray) -> None:
        """Lay the overlay over ``buf``, the file's bytes at ``offset``."""
        end = offset + len(buf)
        i = bisect.bisect_right(self.ends, offset)
        while i < len(self.starts) and self.starts[i] < end:
            s, e, payload = self.starts[i], self.ends[i], self.payloads[i]
            lo, hi = max(s, offset), min(e, end)
            if payload is None:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                buf[lo - offset : hi - offset] = payload[lo - s : hi - s]
            i += 1


class LogReplayNode(FilterNode):
    """The file as it reads after replaying its VHDX log: a read-only, in-memory overlay."""

    driver = "vhdx-log-replay"

    def __init__(self, child: BlockNode, overlay: ReplayOverlay) -> None:
        super().__init__(child, read_only=True, label=child.label)
        self.overlay = overlay

    async def open(self) -> None:
        self.size = max(self.file.size, self.overlay.file_size)

    def info(self) -> dict[str, Any]:
        info = dict(self.file.info())
        info["log-entries-replayed"] = self.overlay.entries_replayed
        return info

    async def _pread(self, offset: int, length: int) -> Buffer:
        buf = bytearray(length)
        stored = min(length, max(0, self.file.size - offset))
        if stored:
            buf[:stored] = await self.file.pread(offset, stored)
        self.overlay.apply(offset, buf)
        return buf

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        # The format node above never asks; a whole-file answer is enough for tools that do.
        return BlockStatus.DATA | BlockStatus.ALLOCATED, length
