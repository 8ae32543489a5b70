"""VHDX images qemu-img cannot make, built by hand from MS-VHDX: differencing files, pending
logs, patched fields. Used by tests/drivers/format/test_vhdx*.py.

Everything written here that QEMU can read is checked against QEMU in the tests (a pending log
is replayed by ``qemu-img check -r all`` on a copy); differencing files QEMU cannot read, so
their expected bytes are computed from the parent's ``qemu-img convert`` output.
"""

from __future__ import annotations

import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.images import QEMU_IMG, create, qemu_io, reference_raw, run
from vdiskfs.drivers.format.vhdx.crc32c import crc32c_zeroed

MIB = 1 << 20
KIB = 1 << 10
HEADER_OFFSETS = (64 * KIB, 128 * KIB)
REGION_OFFSETS = (192 * KIB, 256 * KIB)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6


# -- reading what qemu-img made --

@dataclass
class Layout:
    active_header: int
    headers: list[bytearray]
    bat_offset: int
    bat_length: int
    metadata_offset: int
    items: dict[uuid.UUID, tuple[int, int]]
    block_size: int
    logical_sector_size: int
    virtual_size: int
    log_offset: int
    log_length: int

    @property
    def data_write_guid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(self.headers[self.active_header][32:48]))

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.logical_sector_size // self.block_size


def read_layout(path: Path) -> Layout:
    data = path.read_bytes()
    headers = [bytearray(data[o : o + 4 * KIB]) for o in HEADER_OFFSETS]
    seqs = [struct.unpack_from("<Q", h, 8)[0] for h in headers]
    active = 0 if seqs[0] > seqs[1] else 1
    log_length, log_offset = struct.unpack_from("<IQ", headers[active], 68)
    regions = {}
    count = struct.unpack_from("<I", data, REGION_OFFSETS[0] + 8)[0]
    for i in range(count):
        guid, offset, length, _ = struct.unpack_from("<16sQII", data,
                                                     REGION_OFFSETS[0] + 16 + 32 * i)
        regions[uuid.UUID(bytes_le=guid)] = (offset, length)
    md_offset = regions[METADATA_GUID][0]
    items = {}
    for i in range(struct.unpack_from("<H", data, md_offset + 10)[0]):
        guid, offset, length = struct.unpack_from("<16sII", data, md_offset + 32 + 32 * i)
        items[uuid.UUID(bytes_le=guid)] = (offset, length)

    def item(guid: uuid.UUID, fmt: str) -> int:
        return struct.unpack_from(fmt, data, md_offset + items[guid][0])[0]

    return Layout(active, headers, *regions[BAT_GUID], md_offset, items,
                  item(FILE_PARAMETERS, "<I"), item(LOGICAL_SECTOR, "<I"),
                  item(VIRTUAL_DISK_SIZE, "<Q"), log_offset, log_length)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def seal(block: bytearray, size: int) -> bytearray:
    """Store the CRC-32C of ``block[:size]`` (checksum field zeroed) at offset 4."""
    struct.pack_into("<I", block, 4, 0)
    struct.pack_into("<I", block, 4, crc32c_zeroed(bytes(block[:size]), 4))
    return block


def rewrite_headers(path: Path, layout: Layout, **fields: object) -> None:
    """Change fields of both headers (``log_guid``, ``sequence``...) and re-checksum them."""
    for index, header in enumerate(layout.headers):
        if "log_guid" in fields:
            header[48:64] = fields["log_guid"].bytes_le  # type: ignore[attr-defined]
        if f"sequence{index}" in fields:
            struct.pack_into("<Q", header, 8, fields[f"sequence{index}"])
        if "log_length" in fields:
            struct.pack_into("<I", header, 68, fields["log_length"])
        write_at(path, HEADER_OFFSETS[index], bytes(seal(header, 4 * KIB)))


def set_metadata_item(path: Path, layout: Layout, guid: uuid.UUID, value: bytes) -> None:
    """Overwrite a metadata item in place (metadata items carry no checksum)."""
    write_at(path, layout.metadata_offset + layout.items[guid][0], value)


# -- a pending log --

@dataclass
class LogUpdate:
    file_offset: int
    #: 4096 bytes to write, or None with ``length`` for a zero descriptor.
    data: bytes | None
    length: int = 4096


def log_entry(updates: list[LogUpdate], *, sequence: int, tail: int, log_guid: uuid.UUID,
              file_size: int) -> bytes:
    """One log entry (MS-VHDX 2.3.1): header, descriptors, data sectors, checksummed."""
    count = len(updates)
    desc_sectors = -(-(count + 2) // 128)
    data_updates = [u for u in updates if u.data is not None]
    entry = bytearray((desc_sectors + len(data_updates)) * 4096)
    struct.pack_into("<4sIIIQII16sQQ", entry, 0, b"loge", 0, len(entry), tail, sequence, count,
                     0, log_guid.bytes_le, file_size, file_size)
    sector = desc_sectors
    for i, update in enumerate(updates):
        at = 64 + 32 * i
        if update.data is None:
            struct.pack_into("<4sIQQQ", entry, at, b"zero", 0, update.length, update.file_offset,
                             sequence)
            continue
        data = update.data
        struct.pack_into("<4sIQQQ", entry, at, b"desc", struct.unpack_from("<I", data, 4092)[0],
                         struct.unpack_from("<Q", data, 0)[0], update.file_offset, sequence)
        base = sector * 4096
        entry[base : base + 4096] = (b"data" + struct.pack("<I", sequence >> 32) + data[8:4092]
                                     + struct.pack("<I", sequence & 0xFFFFFFFF))
        sector += 1
    return bytes(seal(entry, len(entry)))


def write_pending_log(path: Path, entries: list[list[LogUpdate]], *, first_sequence: int = 7,
                      log_guid: uuid.UUID | None = None) -> uuid.UUID:
    """Write ``entries`` as one sequence at the start of the log, and set the headers' log
    GUID so the log must be replayed before the file is read."""
    layout = read_layout(path)
    log_guid = log_guid or uuid.uuid4()
    file_size = path.stat().st_size
    position = 0
    for i, updates in enumerate(entries):
        entry = log_entry(updates, sequence=first_sequence + i, tail=0, log_guid=log_guid,
                          file_size=file_size)
        write_at(path, layout.log_offset + position, entry)
        position += len(entry)
    rewrite_headers(path, layout, log_guid=log_guid)
    return log_guid


def dirty_log_image(directory: Path) -> tuple[Path, bytes]:
    """A dynamic image whose log holds two entries QEMU would replay on a writable open: they
    map block 1 to a new payload block, turn block 2 into a zero block, and update and zero
    parts of the new block. Returns it and the guest bytes of QEMU's replay of a copy."""
    path = create(directory / "dirty.vhdx", 8 * MIB, "vhdx", block_size="1M", log_size="1M")
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 2M 1M", fmt="vhdx")
    layout = read_layout(path)
    new_block = -(-path.stat().st_size // MIB) * MIB
    with open(path, "r+b") as f:
        f.truncate(new_block + MIB)
        f.seek(new_block)
        f.write(b"\x77" * MIB)
    bat_sector = bytearray(path.read_bytes()[layout.bat_offset : layout.bat_offset + 4096])
    struct.pack_into("<Q", bat_sector, 8, new_block | FULLY_PRESENT)
    struct.pack_into("<Q", bat_sector, 16, ZERO)
    write_pending_log(path, [
        [LogUpdate(layout.bat_offset, bytes(bat_sector))],
        [LogUpdate(new_block + 4096, None, 8192), LogUpdate(new_block + 65536, b"\x99" * 4096)],
    ])
    replayed = directory / "replayed.vhdx"
    shutil.copyfile(path, replayed)
    run(QEMU_IMG, "check", "-r", "all", replayed)
    return path, reference_raw(replayed, directory / "replayed.raw", "vhdx").read_bytes()


# -- a differencing file --

@dataclass
class DiffSpec:
    virtual_size: int
    block_size: int = MIB
    logical_sector_size: int = 512
    #: Payload state per block (default NOT_PRESENT).
    states: dict[int, int] = field(default_factory=dict)
    #: Data of FULLY_PRESENT blocks and of the present sectors of PARTIALLY_PRESENT ones.
    blocks: dict[int, bytes] = field(default_factory=dict)
    #: Present sectors of each PARTIALLY_PRESENT block.
    sectors: dict[int, set[int]] = field(default_factory=dict)
    locator: dict[str, str] = field(default_factory=dict)


def _locator_item(entries: dict[str, str]) -> bytes:
    header = struct.pack("<16sHH", VHDX_LOCATOR_TYPE.bytes_le, 0, len(entries))
    table = b""
    strings = b""
    base = len(header) + 12 * len(entries)
    for key, value in entries.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        table += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(k), len(k),
                             len(v))
        strings += k + v
    return header + table + strings


def build_differencing(path: Path, spec: DiffSpec) -> None:
    """Write a differencing VHDX: headers, region tables, metadata with a parent locator,
    BAT with interleaved sector bitmap entries, payload and sector bitmap blocks."""
    log_offset, metadata_offset, bat_offset, data_offset = MIB, 2 * MIB, 3 * MIB, 4 * MIB
    chunk_ratio = (1 << 23) * spec.logical_sector_size // spec.block_size
    blocks = -(-spec.virtual_size // spec.block_size)
    chunks = -(-blocks // chunk_ratio)
    bat = bytearray(8 * chunks * (chunk_ratio + 1))
    assert len(bat) <= MIB
    out = bytearray(data_offset)
    out[0:8] = b"vhdxfile"
    for i, offset in enumerate(HEADER_OFFSETS):
        header = bytearray(4 * KIB)
        struct.pack_into("<4sIQ16s16s16sHHIQ", header, 0, b"head", 0, 10 + i, uuid.uuid4().bytes,
                         uuid.uuid4().bytes, bytes(16), 0, 1, MIB, log_offset)
        out[offset : offset + 4 * KIB] = seal(header, 4 * KIB)
    region = bytearray(64 * KIB)
    struct.pack_into("<4sIII", region, 0, b"regi", 0, 2, 0)
    struct.pack_into("<16sQII", region, 16, BAT_GUID.bytes_le, bat_offset, MIB, 1)
    struct.pack_into("<16sQII", region, 48, METADATA_GUID.bytes_le, metadata_offset, MIB, 1)
    seal(region, 64 * KIB)
    for offset in REGION_OFFSETS:
        out[offset : offset + 64 * KIB] = region
    items = [
        (FILE_PARAMETERS, struct.pack("<II", spec.block_size, 0x2)),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", spec.virtual_size)),
        (PAGE83, uuid.uuid4().bytes_le),
        (LOGICAL_SECTOR, struct.pack("<I", spec.logical_sector_size)),
        (PHYSICAL_SECTOR, struct.pack("<I", 4096)),
        (PARENT_LOCATOR, _locator_item(spec.locator)),
    ]
    table = bytearray(64 * KIB)
    struct.pack_into("<8sHH", table, 0, b"metadata", 0, len(items))
    item_offset = 64 * KIB
    for i, (guid, value) in enumerate(items):
        struct.pack_into("<16sIII", table, 32 + 32 * i, guid.bytes_le, item_offset, len(value),
                         0x6 if guid != PARENT_LOCATOR else 0x4)
        out[metadata_offset + item_offset : metadata_offset + item_offset + len(value)] = value
        item_offset += 4 * KIB
    out[metadata_offset : metadata_offset + 64 * KIB] = table
    # Payload blocks, then one sector bitmap block per chunk that needs one.
    bitmaps: dict[int, bytearray] = {}
    for block in range(blocks):
        state = spec.states.get(block, NOT_PRESENT)
        index = block + block // chunk_ratio
        entry = state
        if state in (FULLY_PRESENT, PARTIALLY_PRESENT):
            offset = len(out)
            out += spec.blocks[block].ljust(spec.block_size, b"\0")
            entry |= offset
        struct.pack_into("<Q", bat, 8 * index, entry)
        if state == PARTIALLY_PRESENT:
            chunk, in_chunk = divmod(block, chunk_ratio)
            bitmap = bitmaps.setdefault(chunk, bytearray(MIB))
            per_block = spec.block_size // spec.logical_sector_size
            for sector in spec.sectors[block]:
                bit = in_chunk * per_block + sector
                bitmap[bit // 8] |= 1 << (bit % 8)
    for chunk, bitmap in bitmaps.items():
        offset = len(out)
        out += bitmap
        struct.pack_into("<Q", bat, 8 * (chunk * (chunk_ratio + 1) + chunk_ratio),
                         offset | SB_PRESENT)
    out[bat_offset : bat_offset + len(bat)] = bat
    path.write_bytes(bytes(out))


def expected_differencing(parent: bytes, spec: DiffSpec) -> bytes:
    """The guest bytes of the file ``build_differencing(spec)`` writes over ``parent``."""
    out = bytearray(parent[: spec.virtual_size].ljust(spec.virtual_size, b"\0"))
    sector = spec.logical_sector_size
    for block, state in spec.states.items():
        start = block * spec.block_size
        end = min(start + spec.block_size, spec.virtual_size)
        if state == FULLY_PRESENT:
            out[start:end] = spec.blocks[block][: end - start]
        elif state in (ZERO, UNDEFINED, UNMAPPED):
            out[start:end] = bytes(end - start)
        elif state == PARTIALLY_PRESENT:
            for s in spec.sectors[block]:
                out[start + s * sector : start + (s + 1) * sector] = \
                    spec.blocks[block][s * sector : (s + 1) * sector]
    return bytes(out)
