"""What a partition table scan returns, and the limits every scan obeys.

The values are plain frozen dataclasses, in bytes, so that the FUSE layer can turn a
:class:`Partition` into a window (:func:`vdiskfs.partitions.open_window`, an offset filter)
and ``vdiskfs info`` can print it without knowing MBR from GPT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

__all__ = [
    "MAX_PARTITION_NUMBER",
    "MAX_WARNINGS",
    "Diagnostics",
    "Partition",
    "PartitionTable",
]

log = logging.getLogger("vdiskfs.partitions")

#: Highest partition number exposed. Linux parses into ``DISK_MAX_PARTS`` (256) slots, slot 0
#: being the whole disk, so partitions are numbered 1..255 (block/partitions/check.c); a GPT entry
#: or logical partition that would be numbered higher is dropped with a warning, as Linux drops it.
MAX_PARTITION_NUMBER = 255

#: Warnings kept per table. A hostile table can make every pair of entries overlap; the user needs
#: the first few, not tens of thousands of lines.
MAX_WARNINGS = 64


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition as Linux would expose it (``/dev/sdaN``), in bytes from the disk's start."""

    #: The number Linux gives it: MBR primaries 1-4 by slot, logical partitions from 5 in chain
    #: order, GPT entries by index + 1. Skipped entries leave gaps.
    number: int
    #: Offset of the first byte, in bytes.
    start: int
    #: Bytes exposed: for an extended partition the 1 KiB (one logical sector if larger) that
    #: Linux exposes; for a partition that ran past the end of the disk, what is left of it.
    size: int
    #: ``"mbr"`` or ``"gpt"``.
    scheme: str
    #: MBR: the type byte as ``"0x83"``; GPT: the type GUID, lowercase canonical form.
    type: str
    #: Human name of the type (``"Linux"``, ``"EFI System"``, ``"extended"``...), ``"unknown"``
    #: when the table of names does not know it.
    type_name: str
    #: GPT partition name, decoded from UTF-16LE up to the first NUL. May hold any character.
    name: str = ""
    #: GPT unique partition GUID (what Linux calls PARTUUID), lowercase canonical form.
    guid: str = ""
    #: MBR: boot indicator 0x80. GPT: attribute bit 2, "legacy BIOS bootable".
    bootable: bool = False
    #: GPT attribute bits as stored (bit 0 required, bit 1 no block-IO protocol, bit 2 legacy
    #: BIOS bootable, bits 48-63 type-specific). 0 for MBR.
    attributes: int = 0
    #: MBR: this is the extended partition itself (types 0x05, 0x0f, 0x85), exposed as Linux
    #: exposes it: a small window over its first sector(s), never its logical partitions' data.
    extended: bool = False
    #: MBR: a logical partition, found in the extended partition's EBR chain.
    logical: bool = False
    #: Bytes the table declares. Differs from :attr:`size` for an extended partition (its whole
    #: extent) and for a partition truncated at the end of the disk.
    declared_size: int = 0

    @property
    def end(self) -> int:
        """Offset one past the last byte exposed."""
        return self.start + self.size


@dataclass(frozen=True, slots=True)
class PartitionTable:
    """The partitions of a disk, in number order, and what was wrong with the table."""

    #: ``"mbr"``, ``"gpt"``, or ``None`` when the disk has no partition table.
    scheme: str | None
    partitions: tuple[Partition, ...] = ()
    #: One line per damaged or skipped entry, backup GPT used, overlap found... Also logged.
    warnings: tuple[str, ...] = ()
    #: Logical sector size the table was read with: 512, or 4096 for a GPT found at byte 4096.
    sector_size: int = 512
    #: GPT disk GUID, lowercase canonical form; ``""`` for MBR.
    disk_guid: str = ""
    #: MBR disk signature (bytes 440-443) as ``"0x1a2b3c4d"``, as ``sfdisk`` prints its
    #: label-id; ``""`` for GPT.
    disk_signature: str = ""

    def by_number(self, number: int) -> Partition | None:
        """The partition Linux would call ``<disk><number>``, if there is one."""
        for partition in self.partitions:
            if partition.number == number:
                return partition
        return None


@dataclass
class Diagnostics:
    """Collects the warnings of one scan: bounded, each one logged once, prefixed by the disk."""

    label: str
    warnings: list[str] = field(default_factory=list)
    suppressed: int = 0

    def warn(self, message: str) -> None:
        if len(self.warnings) >= MAX_WARNINGS:
            self.suppressed += 1
            return
        text = f"{self.label}: {message}" if self.label else message
        self.warnings.append(text)
        log.warning("%s", text)

    def result(self) -> tuple[str, ...]:
        if self.suppressed:
            more = f"{self.suppressed} more partition table warnings suppressed"
            log.warning("%s: %s", self.label, more)
            return (*self.warnings, f"{self.label}: {more}" if self.label else more)
        return tuple(self.warnings)
