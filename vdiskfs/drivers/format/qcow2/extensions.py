"""qcow2 header extensions (docs/interop/qcow2.txt "Header extensions"): the area after the
fixed header, walked as QEMU's ``qcow2_read_extensions`` walks it. Pure parsing, every refusal
naming the field and its offset.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from vdiskfs.errors import FormatError

__all__ = [
    "EXT_BACKING_FORMAT",
    "EXT_BITMAPS",
    "EXT_CRYPTO_HEADER",
    "EXT_DATA_FILE",
    "EXT_END",
    "EXT_FEATURE_TABLE",
    "MAX_BACKING_FORMAT_NAME",
    "Extensions",
    "parse_extensions",
]

#: QEMU keeps the backing format in ``char backing_format[16]``.
MAX_BACKING_FORMAT_NAME = 15

# -- extension types ----------------------------------------------------------------------------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_EXT_HEADER = struct.Struct(">II")
_FEATURE_ENTRY_SIZE = 48



@dataclass(slots=True)
class Extensions:
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    unknown: list[int] = field(default_factory=list)


def parse_extensions(data: bytes, start: int, end: int, path: str) -> Extensions:
    """Walk the extension area ``[start, end)`` as ``qcow2_read_extensions`` does."""
    found = Extensions()
    offset = start
    # Bytes past the end of a short file read as zeros in QEMU, i.e. as the end marker.
    end = min(end, len(data))
    while offset + _EXT_HEADER.size <= end:
        magic, length = _EXT_HEADER.unpack_from(data, offset)
        body = offset + _EXT_HEADER.size
        if magic == EXT_END:
            break
        if length > end - body:
            raise FormatError(
                f"header extension {magic:#010x} of {length} bytes overruns the header area "
                f"(ends at {end:#x})",
                path=path,
                field="header extension length",
                offset=offset + 4,
            )
        payload = bytes(data[body : body + length])
        if magic == EXT_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT_NAME:
                raise FormatError(
                    f"backing format name of {length} bytes is too long "
                    f"(at most {MAX_BACKING_FORMAT_NAME})",
                    path=path,
                    field="backing format extension",
                    offset=offset,
                )
            found.backing_format = _ascii_name(payload, path, "backing format extension",
                                               body, may_be_empty=False)
        elif magic == EXT_DATA_FILE:
            found.data_file = os.fsdecode(payload)
        elif magic == EXT_FEATURE_TABLE:
            if length % _FEATURE_ENTRY_SIZE:
                raise FormatError(
                    f"feature name table of {length} bytes is not a whole number of "
                    f"{_FEATURE_ENTRY_SIZE}-byte entries",
                    path=path,
                    field="feature name table",
                    offset=offset + 4,
                )
            for entry in range(0, length, _FEATURE_ENTRY_SIZE):
                kind, bit = payload[entry], payload[entry + 1]
                name = _ascii_name(payload[entry + 2 : entry + _FEATURE_ENTRY_SIZE], path,
                                   "feature name table", body + entry + 2, may_be_empty=True)
                found.feature_names[(kind, bit)] = name
        else:
            # Bitmaps and the crypto header only matter to writers and to encrypted images
            # (refused by crypt_method); anything else is a compatible extension to skip.
            found.unknown.append(magic)
        offset = body + ((length + 7) & ~7)
    return found


def _ascii_name(raw: bytes, path: str, field: str, offset: int, *, may_be_empty: bool) -> str:
    """A name stored in a header extension: printable ASCII, as QEMU writes them.

    NUL bytes may follow the name (a feature name fills a fixed 46-byte slot; QEMU reads a
    backing format as a C string), but no text after them. Anything else -- control bytes
    (which would reach the user's terminal inside an error message), bytes above 0x7e, an empty
    name where one is needed -- is a FormatError naming the field, never a name mangled into
    something else.
    """
    text = raw.rstrip(b"\0")
    problem = None if text or may_be_empty else "is empty"
    if problem is None and not all(0x20 <= c < 0x7F for c in text):
        problem = f"{text!r} is not printable ASCII"
        if b"\0" in text:
            problem = f"{text!r} has a NUL byte inside"
    if problem is not None:
        raise FormatError(f"name {problem}", path=path, field=field, offset=offset)
    return text.decode("ascii")
