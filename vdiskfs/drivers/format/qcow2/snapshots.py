"""The internal snapshot table: bytes in, :class:`Snapshot` records out (``qcow2_read_snapshots``).

Entries have variable length (extra data, ID and name strings), so the table's size is known only
once it is parsed. :func:`parse_snapshot_table` works on whatever prefix of the table the driver
read and raises :class:`NeedMoreData` with the length it needs, so the driver can read the table
in a few growing steps without trusting a size from the image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from vdiskfs.drivers.format.qcow2.header import QCOW_MAX_SNAPSHOTS
from vdiskfs.errors import FormatError

__all__ = ["MAX_TABLE_SIZE", "NeedMoreData", "Snapshot", "find_snapshot", "parse_snapshot_table",
           "shown_text"]

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
_EXTRA_VM_STATE = struct.Struct(">Q")  # extra data bytes 0..7
_EXTRA_DISK_SIZE = struct.Struct(">Q")  # bytes 8..15
_EXTRA_ICOUNT = struct.Struct(">Q")  # bytes 16..23
#: QEMU: QCOW_MAX_SNAPSHOT_EXTRA_DATA.
MAX_EXTRA_DATA = 1024
#: QEMU: QCOW_MAX_SNAPSHOTS_SIZE (an average of 1 KiB per entry).
MAX_TABLE_SIZE = 1024 * QCOW_MAX_SNAPSHOTS
_NO_ICOUNT = (1 << 64) - 1


class NeedMoreData(Exception):
    """The table continues past the bytes given; ``needed`` bytes from its start are required."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One internal snapshot."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    #: Guest disk size when the snapshot was taken (None: the entry does not record it).
    disk_size: int | None
    #: Instruction count for record/replay (None: not recorded).
    icount: int | None
    #: Bytes from the start of the table to the end of this entry (the last entry's value is
    #: the table's length, which a refcount rebuild counts).
    entry_end: int = 0

    def virtual_size(self, current: int) -> int:
        """The guest disk size of the snapshot: recorded, else (an entry without that extra
        data, as old QEMU wrote them) the image's ``current`` size, as QEMU assumes."""
        return current if self.disk_size is None else self.disk_size

    def info(self) -> dict[str, Any]:
        """The entry as ``qemu-img info --output=json`` lists it."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            out["icount"] = self.icount
        return out


def parse_snapshot_table(data: bytes, count: int, table_offset: int,
                         path: str) -> list[Snapshot]:
    """Parse ``count`` entries from ``data``, the start of the table at ``table_offset``.

    Raises :class:`NeedMoreData` when ``data`` ends inside the table, and
    :class:`FormatError` for an entry QEMU would refuse or a table over QEMU's size limit.
    """
    snapshots: list[Snapshot] = []
    pos = 0
    for number in range(count):
        pos = (pos + 7) & ~7  # entries start 8-byte aligned
        entry_offset = table_offset + pos
        _need(data, pos + _ENTRY.size, path)
        (l1_table_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_size) = _ENTRY.unpack_from(data, pos)
        if extra_size > MAX_EXTRA_DATA:
            raise FormatError(
                f"snapshot {number} has {extra_size} bytes of extra data "
                f"(at most {MAX_EXTRA_DATA})",
                path=path,
                field="snapshot extra_data_size",
                offset=entry_offset + 36,
            )
        extra_start = pos + _ENTRY.size
        strings_start = extra_start + extra_size
        entry_end = strings_start + id_size + name_size
        _need(data, entry_end, path)
        extra = data[extra_start:strings_start]
        if extra_size >= 8:
            (vm_state_size,) = _EXTRA_VM_STATE.unpack_from(extra, 0)
        disk_size = _EXTRA_DISK_SIZE.unpack_from(extra, 8)[0] if extra_size >= 16 else None
        icount = _EXTRA_ICOUNT.unpack_from(extra, 16)[0] if extra_size >= 24 else _NO_ICOUNT
        snapshots.append(
            Snapshot(
                id=_text(data[strings_start : strings_start + id_size]),
                name=_text(data[strings_start + id_size : entry_end]),
                l1_table_offset=l1_table_offset,
                l1_size=l1_size,
                date_sec=date_sec,
                date_nsec=date_nsec,
                vm_clock_nsec=vm_clock_nsec,
                vm_state_size=vm_state_size,
                disk_size=disk_size,
                icount=None if icount == _NO_ICOUNT else icount,
                entry_end=entry_end,
            )
        )
        pos = entry_end
    return snapshots


def find_snapshot(snapshots: list[Snapshot], wanted: str, path: str) -> Snapshot:
    """The snapshot whose ID, else whose name, is ``wanted`` (the first match, as QEMU's
    ``find_snapshot_by_id_or_name``); an error listing the ones there are otherwise."""
    for key in ("id", "name"):
        for snapshot in snapshots:
            if getattr(snapshot, key) == wanted:
                return snapshot
    if snapshots:
        listed = ", ".join(f"{shown_text(s.id)} {shown_text(s.name)}" for s in snapshots[:20])
        more = f" and {len(snapshots) - 20} more" if len(snapshots) > 20 else ""
        known = f"the image has (ID name): {listed}{more}"
    else:
        known = "the image has none"
    raise FormatError(f"no internal snapshot with ID or name {shown_text(wanted)}; {known}",
                      path=path, field="snapshot")


def shown_text(text: str, limit: int = 64) -> str:
    """A name from the image, safe to print in one line: quoted and escaped (control
    characters, NUL), cut after ``limit`` characters."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return repr(cut)


def _need(data: bytes, end: int, path: str) -> None:
    if end > MAX_TABLE_SIZE:
        raise FormatError(
            f"snapshot table is larger than {MAX_TABLE_SIZE} bytes",
            path=path,
            field="snapshot table",
        )
    if end > len(data):
        raise NeedMoreData(end)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
