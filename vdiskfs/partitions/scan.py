"""Which table a disk has, and the checks every partition passes before it is exposed.

The scheme is chosen as Linux chooses it (the EFI parser runs before the msdos one):

* an MBR with a 0xee entry (protective or hybrid) is a GPT disk: the GPT's partitions, or none
  when no valid GPT header is found -- a hybrid MBR's own entries are never used;
* an MBR without one is read as MBR, even if a stale GPT header lingers at LBA 1 (warned);
* a disk with no 0x55AA signature has no table, unless a valid GPT header is found anyway
  (LBA 0 wiped): then the GPT is used, with a warning, where Linux would need ``gpt`` on its
  command line.

Then, as Linux's ``blk_add_partition`` does: a partition that starts beyond the end of the disk is
skipped, one that runs past it is cut at the end (an MBR written by camera firmware for a larger
card); both are warned. Overlapping partitions are all exposed, as Linux exposes them, with one
warning per partition.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from vdiskfs.partitions import gpt, mbr
from vdiskfs.partitions.model import Diagnostics, Partition, PartitionTable
from vdiskfs.partitions.reader import SectorReader

if TYPE_CHECKING:
    from vdiskfs.block.node import BlockNode

__all__ = ["SECTOR_SIZES", "read_partition_table"]

#: Logical sector sizes accepted. A GPT is looked for with 512 and 4096; an MBR does not record
#: its sector size, so one written with another size needs ``sector_size=``.
SECTOR_SIZES = (512, 1024, 2048, 4096)
_GPT_PROBE_SIZES = (512, 4096)


async def read_partition_table(node: BlockNode, *, label: str | None = None,
                               sector_size: int | None = None) -> PartitionTable:
    """Read the MBR or GPT of ``node`` (any format: only ``node.pread`` is used).

    ``sector_size`` forces the logical sector size; by default a GPT header is looked for at byte
    512, then 4096 (primary), then in the last 512- or 4096-byte sector (backup), and an MBR is
    read with 512-byte sectors. ``label`` names the disk in warnings (default: ``node.label``).

    A damaged table never raises: bad entries are skipped and every problem is a line of
    :attr:`PartitionTable.warnings`, also logged on the ``vdiskfs.partitions`` logger. Only an
    I/O error of the node itself propagates (as the :class:`~vdiskfs.errors.VdiskError` the node
    raised). Every read is bounded: one sector per EBR, at most a few hundred EBRs, and at most
    :data:`~vdiskfs.partitions.gpt.MAX_ENTRY_ARRAY_BYTES` of GPT entries per header.
    """
    if sector_size is not None and sector_size not in SECTOR_SIZES:
        raise ValueError(f"sector size {sector_size} is not one of {SECTOR_SIZES}")
    diag = Diagnostics(node.label if label is None else label)
    table = await _scan(node, sector_size, diag)
    return dataclasses.replace(table, warnings=diag.result())


async def _scan(node: BlockNode, forced_size: int | None, diag: Diagnostics) -> PartitionTable:
    default_size = forced_size or 512
    if node.size < mbr.BOOT_RECORD_SIZE:
        return PartitionTable(None, sector_size=default_size)
    sector0 = bytes(await node.pread(0, mbr.BOOT_RECORD_SIZE))
    record = mbr.decode_boot_record(sector0)

    if record is not None and (protective := record.protective_entry()) is not None:
        if protective.start_lba != gpt.PRIMARY_HEADER_LBA:
            diag.warn(f"protective MBR entry (slot {protective.slot}) starts at LBA "
                      f"{protective.start_lba}, not 1: GPT read anyway")
        hybrid = [str(e.slot) for e in record.entries if e.type not in (0, mbr.PROTECTIVE_TYPE)]
        if hybrid:
            slots = "slot" if len(hybrid) == 1 else "slots"
            diag.warn(f"hybrid MBR: entries in {slots} {', '.join(hybrid)} ignored, the GPT is "
                      "used (as Linux does)")
        size = forced_size or await _find_gpt_sector_size(node) or 512
        return await _gpt_table(node, size, diag)

    if record is None:
        found = forced_size if forced_size is not None else await _find_gpt_sector_size(node)
        if found is None or not await _has_gpt_signature(node, found):
            return PartitionTable(None, sector_size=default_size)
        diag.warn("GPT found on a disk without a protective MBR (no 0x55AA signature at byte "
                  "510): GPT used (Linux needs the 'gpt' boot option for this)")
        return await _gpt_table(node, found, diag)

    bad = record.invalid_boot_indicator()
    if bad is not None:
        # As Linux: a 0x55AA sector with a boot indicator other than 0 or 0x80 is a boot
        # sector, not a table. A whole-disk FAT file system is no news; anything else is.
        if not (bad.slot == 1 and mbr.looks_like_fat_boot_sector(sector0)):
            diag.warn(f"MBR slot {bad.slot} has boot indicator 0x{bad.boot_indicator:02x} "
                      "(not 0x00 or 0x80): not a partition table, no partitions")
        return PartitionTable(None, sector_size=default_size)

    for probe_size in [forced_size] if forced_size else _GPT_PROBE_SIZES:
        if await _has_gpt_primary(node, probe_size):
            diag.warn(f"a GPT header at LBA 1 ({probe_size}-byte sectors) is ignored: the MBR "
                      "has no protective (0xee) entry, so the MBR is used, as Linux does")
            break
    disk = SectorReader(node, default_size)
    partitions = await mbr.scan_mbr(disk, record, diag)
    return PartitionTable(
        "mbr",
        _check_extents(partitions, node.size, diag),
        sector_size=default_size,
        disk_signature=f"0x{record.disk_signature:08x}",
    )


async def _gpt_table(node: BlockNode, sector_size: int, diag: Diagnostics) -> PartitionTable:
    found = await gpt.scan_gpt(SectorReader(node, sector_size), diag)
    if found is None:
        return PartitionTable("gpt", sector_size=sector_size)
    return PartitionTable(
        "gpt",
        _check_extents(found.partitions, node.size, diag),
        sector_size=sector_size,
        disk_guid=found.header.disk_guid,
    )


async def _read_at(node: BlockNode, offset: int, length: int) -> bytes:
    if offset < 0 or offset + length > node.size:
        return b""
    return bytes(await node.pread(offset, length))


async def _has_gpt_primary(node: BlockNode, sector_size: int) -> bool:
    head = await _read_at(node, sector_size * gpt.PRIMARY_HEADER_LBA, len(gpt.GPT_SIGNATURE))
    return head == gpt.GPT_SIGNATURE


async def _has_gpt_backup(node: BlockNode, sector_size: int) -> bool:
    last_lba = node.size // sector_size - 1
    if last_lba <= gpt.PRIMARY_HEADER_LBA:
        return False
    head = await _read_at(node, last_lba * sector_size, len(gpt.GPT_SIGNATURE))
    return head == gpt.GPT_SIGNATURE


async def _has_gpt_signature(node: BlockNode, sector_size: int) -> bool:
    return await _has_gpt_primary(node, sector_size) or await _has_gpt_backup(node, sector_size)


async def _find_gpt_sector_size(node: BlockNode) -> int | None:
    """The sector size at which a GPT signature sits: primaries first, then backups."""
    for size in _GPT_PROBE_SIZES:
        if await _has_gpt_primary(node, size):
            return size
    for size in _GPT_PROBE_SIZES:
        if await _has_gpt_backup(node, size):
            return size
    return None


def _check_extents(partitions: list[Partition], disk_size: int,
                   diag: Diagnostics) -> tuple[Partition, ...]:
    """Skip partitions starting beyond the disk, cut those running past it, report overlaps."""
    kept: list[Partition] = []
    for part in partitions:
        if part.start >= disk_size:
            diag.warn(f"partition {part.number} starts at byte {part.start}, beyond the end of "
                      f"the disk ({disk_size} bytes): skipped")
            continue
        if part.end > disk_size:
            diag.warn(f"partition {part.number} ({part.size} bytes at {part.start}) extends "
                      f"beyond the end of the disk ({disk_size} bytes): truncated to "
                      f"{disk_size - part.start} bytes, as Linux does")
            part = dataclasses.replace(part, size=disk_size - part.start)
        kept.append(part)
    _warn_overlaps(kept, diag)
    return tuple(kept)


def _warn_overlaps(partitions: list[Partition], diag: Diagnostics) -> None:
    # The extended partition's window is a view of its first EBR, which its logical partitions
    # surround by design: it takes no part. One sweep in start order, one warning per partition
    # at most, so a hostile table costs O(n log n) and n lines.
    spans = sorted((p for p in partitions if not p.extended), key=lambda p: (p.start, p.number))
    widest: Partition | None = None
    for part in spans:
        if widest is not None and part.start < widest.end:
            first, second = sorted((widest, part), key=lambda p: p.number)
            diag.warn(f"partitions {first.number} and {second.number} overlap (bytes "
                      f"{part.start}-{min(part.end, widest.end) - 1}): both exposed, as Linux "
                      "exposes them")
        if widest is None or part.end > widest.end:
            widest = part
