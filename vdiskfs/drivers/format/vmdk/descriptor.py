"""The VMDK text descriptor: a small ``key=value`` file naming the extents and the parent.

A descriptor is either a file of its own (``monolithicFlat``, ``twoGbMaxExtent*``: the extents
lie beside it) or embedded in the first sparse extent (``monolithicSparse``,
``streamOptimized``)::

    # Disk DescriptorFile
    version=1
    CID=c42da8c7
    parentCID=ffffffff
    createType="twoGbMaxExtentSparse"
    parentFileNameHint="base.vmdk"

    # Extent description
    RW 4192256 SPARSE "disk-s001.vmdk"
    RW 4192256 FLAT "disk-f002.vmdk" 0
    RW 2048 ZERO

    ddb.geometry.cylinders = "4161"

This module only parses: it never opens a file. Every function is pure and bounded; errors are
:class:`~vdiskfs.errors.FormatError` naming the descriptor, the line and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vdiskfs.errors import FormatError, UnsupportedError

__all__ = [
    "DESCRIPTOR_CREATE_TYPES",
    "EXTENT_TYPES_FLAT",
    "EXTENT_TYPES_SPARSE",
    "MAX_DESCRIPTOR_SIZE",
    "MAX_EXTENTS",
    "NO_PARENT_CID",
    "Descriptor",
    "ExtentLine",
    "is_descriptor_text",
    "locate_cid",
    "looks_like_descriptor",
    "parse_descriptor",
    "replacement_cid",
]

#: The most descriptor bytes read: QEMU reads at most 1 MiB - 1; real descriptors are < 2 KiB.
MAX_DESCRIPTOR_SIZE = 1 << 20
#: The most extents accepted. A 2 TiB twoGbMaxExtent disk has 1024; each extent holds a file open.
MAX_EXTENTS = 4096
#: ``parentCID`` of an image without a parent.
NO_PARENT_CID = 0xFFFFFFFF

#: ``createType`` values of stand-alone descriptor files that vdiskfs reads: QEMU's list
#: (``vmdk_open_desc_file``) plus the ESXi flat variants, whose extents are plain ``VMFS``.
DESCRIPTOR_CREATE_TYPES = frozenset(
    {
        "monolithicFlat",
        "twoGbMaxExtentFlat",
        "twoGbMaxExtentSparse",
        "vmfs",
        "vmfsSparse",
        "vmfsThin",
        "vmfsPreallocated",
        "vmfsEagerZeroedThick",
        "monolithicSparse",
        "streamOptimized",
    }
)
#: Extent types whose bytes are the file's bytes from an offset on.
EXTENT_TYPES_FLAT = frozenset({"FLAT", "VMFS"})
#: Extent types that are sparse extents ("hosted sparse", magic ``KDMV``; ``COWD`` refused later).
EXTENT_TYPES_SPARSE = frozenset({"SPARSE", "VMFSSPARSE"})
_EXTENT_TYPES_REFUSED = {
    "SESPARSE": "ESXi seSparse extents",
    "VMFSRDM": "raw device mappings",
    "VMFSRAW": "raw device mappings",
}
_ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")

# access, size in sectors, type, optional "file name", optional offset in sectors.
_EXTENT_RE = re.compile(
    r'^(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\S+)\s+(?P<type>[A-Za-z]+)'
    r'(?:\s+"(?P<name>[^"]*)")?(?:\s+(?P<offset>\S+))?\s*$'
)
_VERSION_LINE_RE = re.compile(rb"^version=[123]\r?$")
# The CID line (not parentCID): its hexadecimal digits are group 1.
_CID_LINE_RE = re.compile(rb"^[ \t]*CID[ \t]*=[ \t]*\"?(?:0[xX])?([0-9A-Fa-f]+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class ExtentLine:
    """One line of the extent description, as written (sizes in 512-byte sectors)."""

    access: str
    sectors: int
    type: str
    #: File name as written (relative to the descriptor unless absolute); None for ZERO.
    filename: str | None
    #: Start of the extent's data in its file, in sectors (FLAT only; 0 otherwise).
    offset: int
    line_no: int


@dataclass(frozen=True, slots=True)
class Descriptor:
    """The facts of a descriptor that reading needs; ``ddb`` keeps the disk database."""

    version: int | None
    cid: int | None
    parent_cid: int | None
    create_type: str | None
    parent_filename_hint: str | None
    extents: tuple[ExtentLine, ...]
    ddb: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_parent(self) -> bool:
        return self.parent_filename_hint is not None


def looks_like_descriptor(head: bytes) -> bool:
    """Whether ``head`` starts like a text descriptor, as QEMU's ``vmdk_probe`` decides it.

    Comment lines (``# Disk DescriptorFile``...) and blank lines may come first; the first other
    line must be ``version=1``, ``2`` or ``3``. A NUL byte before that line means binary data:
    no other format's header reads as such a text.
    """
    pos = 0
    end = len(head)
    while pos < end:
        newline = head.find(b"\n", pos)
        if newline < 0:
            return False  # the version line must be complete within the head
        line = head[pos:newline]
        pos = newline + 1
        if b"\0" in line:
            return False
        if line.startswith(b"#") or not line.strip(b" \r"):
            continue
        return bool(_VERSION_LINE_RE.match(line))
    return False


_CONTROL_BYTES = bytes(c for c in range(32) if c not in b"\t\n\r")


def is_descriptor_text(data: bytes) -> bool:
    """Whether ``data`` (up to its first NUL) is text at all: no control bytes but tab and
    line ends. Binary data forced through the vmdk driver fails here with a clear message."""
    nul = data.find(b"\0")
    text = data if nul < 0 else data[:nul]
    return bool(text.strip()) and not any(c in _CONTROL_BYTES for c in text)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


#: Numbers as QEMU's sscanf reads them: ASCII digits only (a sign is refused later, with its
#: own message). Python's int() would also take "1_000", blanks and digits of any script.
_DECIMAL_RE = re.compile(r"-?[0-9]{1,20}")
_HEX_RE = re.compile(r"(?:0[xX])?[0-9A-Fa-f]{1,16}")


def _parse_cid(value: str, key: str, label: str, line_no: int) -> int:
    try:
        if not _HEX_RE.fullmatch(value):
            raise ValueError(value)
        cid = int(value, 16)
    except ValueError:
        raise FormatError(
            f"line {line_no}: {key}={value!r} is not a hexadecimal number", path=label, field=key
        ) from None
    if not 0 <= cid <= 0xFFFFFFFF:
        raise FormatError(f"line {line_no}: {key}={value!r} is not a 32-bit value",
                          path=label, field=key)
    return cid


def _parse_extent(line: str, line_no: int, label: str) -> ExtentLine:
    match = _EXTENT_RE.match(line)
    if match is None:
        raise FormatError(f"line {line_no}: invalid extent line {line!r}", path=label,
                          field="extent")
    kind = match["type"]
    where = f"line {line_no} ({line!r})"
    try:
        if not _DECIMAL_RE.fullmatch(match["sectors"]):
            raise ValueError(match["sectors"])
        sectors = int(match["sectors"])
    except ValueError:
        raise FormatError(f"{where}: extent size is not a number", path=label,
                          field="extent") from None
    if sectors <= 0:
        raise FormatError(f"{where}: extent size must be positive", path=label, field="extent")
    name = match["name"]
    raw_offset = match["offset"]
    if kind in _EXTENT_TYPES_REFUSED:
        raise UnsupportedError(f"{where}: {_EXTENT_TYPES_REFUSED[kind]} are not supported",
                               path=label, field="extent")
    if kind == "ZERO":
        if name is not None or raw_offset is not None:
            raise FormatError(f"{where}: a ZERO extent has no file", path=label, field="extent")
    elif kind in EXTENT_TYPES_FLAT or kind in EXTENT_TYPES_SPARSE:
        if not name:
            raise FormatError(f"{where}: extent without a file name", path=label, field="extent")
        if kind == "FLAT" and raw_offset is None:
            raise FormatError(f"{where}: FLAT extent without an offset", path=label,
                              field="extent")
        if kind != "FLAT" and raw_offset is not None:
            raise FormatError(f"{where}: only FLAT extents take an offset", path=label,
                              field="extent")
    else:
        # QEMU skips unknown types, which shifts every later extent: refuse instead.
        raise UnsupportedError(f"{where}: unknown extent type {kind!r}", path=label,
                               field="extent")
    offset = 0
    if raw_offset is not None:
        try:
            if not _DECIMAL_RE.fullmatch(raw_offset):
                raise ValueError(raw_offset)
            offset = int(raw_offset)
        except ValueError:
            raise FormatError(f"{where}: extent offset is not a number", path=label,
                              field="extent") from None
        if offset < 0:
            raise FormatError(f"{where}: negative extent offset", path=label, field="extent")
    return ExtentLine(match["access"], sectors, kind, name, offset, line_no)


def parse_descriptor(data: bytes, label: str) -> Descriptor:
    """Parse descriptor text (up to the first NUL: QEMU pads rewritten descriptors with them).

    Unknown keys are kept in ``ddb`` when they start with ``ddb.`` and ignored otherwise, as are
    lines that are neither settings nor extents, as VMware does. Raises :class:`FormatError`
    for malformed extent lines and bad values, and :class:`UnsupportedError` for extent kinds
    vdiskfs does not read.
    """
    if len(data) > MAX_DESCRIPTOR_SIZE:
        raise FormatError(
            f"descriptor of {len(data)} bytes is larger than {MAX_DESCRIPTOR_SIZE}",
            path=label,
            field="descriptor",
        )
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
    # surrogateescape: non-UTF-8 file names survive the round trip to the file system.
    text = data.decode("utf-8", errors="surrogateescape")
    version: int | None = None
    cid: int | None = None
    parent_cid: int | None = None
    create_type: str | None = None
    parent_hint: str | None = None
    extents: list[ExtentLine] = []
    ddb: dict[str, str] = {}
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.split(None, 1)[0] in _ACCESS_MODES:
            if len(extents) >= MAX_EXTENTS:
                raise FormatError(f"more than {MAX_EXTENTS} extents", path=label,
                                  field="extent")
            extents.append(_parse_extent(line, line_no, label))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue  # not a setting: VMware and QEMU skip such lines too
        key = key.strip()
        value = _unquote(value.strip())
        if key == "version":
            if value not in ("1", "2", "3"):
                raise UnsupportedError(f"descriptor version {value!r}", path=label,
                                       field="version")
            version = int(value)
        elif key == "CID":
            cid = _parse_cid(value, key, label, line_no)
        elif key == "parentCID":
            parent_cid = _parse_cid(value, key, label, line_no)
        elif key == "createType":
            create_type = value
        elif key == "parentFileNameHint":
            if not value:
                raise FormatError(f"line {line_no}: empty parentFileNameHint", path=label,
                                  field="parentFileNameHint")
            parent_hint = value
        elif key.startswith("ddb."):
            ddb[key] = value
    return Descriptor(
        version=version,
        cid=cid,
        parent_cid=parent_cid,
        create_type=create_type,
        parent_filename_hint=parent_hint,
        extents=tuple(extents),
        ddb=ddb,
    )


def locate_cid(data: bytes) -> tuple[int, int] | None:
    """Where the hexadecimal digits of the ``CID`` line lie in descriptor ``data``, as
    ``(start, end)`` byte offsets; None without a CID line (before the first NUL)."""
    nul = data.find(b"\0")
    text = data if nul < 0 else data[:nul]
    match = _CID_LINE_RE.search(text)
    if match is None:
        return None
    return match.start(1), match.end(1)


def replacement_cid(digits: bytes, old: int, random_below: Callable[[int], int]
                    ) -> tuple[int, bytes]:
    """A new CID for an image whose content changed, and its text of exactly ``len(digits)``
    hexadecimal digits (so the descriptor is rewritten in place, no byte around it moving).

    QEMU gives an image a random new CID on the first write after each open
    (``vmdk_pwritev``); ``random_below(n)`` draws from ``[0, n)``. The new CID differs from
    ``old`` and is never ``ffffffff``, which a child's ``parentCID`` uses for "no parent".
    """
    width = len(digits)
    if width == 0:
        raise ValueError("a CID has at least one digit")
    # Without a leading zero the value keeps its width however the reader pads it.
    low = 1 << (4 * (width - 1)) if width < 8 else 0
    high = min(1 << (4 * width), 1 << 32)
    while True:
        cid = low + random_below(high - low)
        if cid != old and cid != NO_PARENT_CID:
            return cid, f"{cid:0{width}x}".encode()
