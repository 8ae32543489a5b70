"""Decompressors for a bzImage payload: gzip, xz, lzma, bzip2, zstd and LZ4 (legacy frames).

The kernel's build appends the uncompressed size (4 bytes, little-endian) after the compressed
stream (for gzip it is the stream's own ISIZE field); every decoder here stops at the end of its
stream, and the output must have exactly that size -- which is how a truncated payload is told
from a short kernel. Output is bounded by ``limit``: a hostile payload cannot make the VMM
allocate without end.

LZ4 is decoded here rather than with a dependency: the kernel uses the *legacy* frame format
(``lz4 -l``: a magic number, then blocks of ``{u32 compressed size, LZ4 block}`` that each
decode to at most 8 MiB), and the block format is a page of code.
"""

from __future__ import annotations

import bz2
import lzma
import zlib

import zstandard

from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["COMPRESSIONS", "decompress", "detect_compression", "lz4_legacy_decompress"]

#: Magic numbers of the compressions a kernel can use (``scripts/Makefile.lib``).
COMPRESSIONS: dict[str, bytes] = {
    "gzip": b"\x1f\x8b",
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
    "lz4": b"\x02\x21\x4c\x18",
    "bzip2": b"BZh",
    "lzma": b"\x5d\x00\x00",
    "lzo": b"\x89LZO",
}

LZ4_LEGACY_MAGIC = 0x184C2102
#: Largest decoded size of one legacy-frame block.
LZ4_LEGACY_BLOCK_MAX = 8 << 20


def detect_compression(payload: bytes) -> str | None:
    for name, magic in COMPRESSIONS.items():
        if payload.startswith(magic):
            return name
    return None


def _too_big(what: str, limit: int, path: str) -> FormatError:
    return FormatError(f"{what} payload decompresses to more than {limit} bytes", path=path)


def decompress(payload: bytes, limit: int, *, path: str = "kernel") -> tuple[str, bytes]:
    """Detect the compression of ``payload`` and decompress it; ``(name, data)``."""
    name = detect_compression(payload)
    try:
        if name == "gzip":
            data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload, limit + 1)
        elif name in ("xz", "lzma"):
            fmt = lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE
            data = lzma.LZMADecompressor(format=fmt).decompress(payload, max_length=limit + 1)
        elif name == "bzip2":
            data = bz2.BZ2Decompressor().decompress(payload, max_length=limit + 1)
        elif name == "zstd":
            reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
                payload, read_across_frames=False
            )
            data = reader.read(limit + 1)
        elif name == "lz4":
            data = lz4_legacy_decompress(payload, limit, path=path)
        elif name == "lzo":
            raise UnsupportedError("LZO-compressed kernels are not supported", path=path)
        else:
            raise FormatError(
                f"unknown kernel payload compression (starts {payload[:6].hex(' ')})", path=path
            )
    except (zlib.error, lzma.LZMAError, OSError, EOFError, zstandard.ZstdError) as exc:
        raise FormatError(f"{name} payload is corrupt: {exc}", path=path) from exc
    if len(data) > limit:
        raise _too_big(name, limit, path)
    expected = int.from_bytes(payload[-4:], "little")
    if len(data) != expected:
        raise FormatError(f"{name} payload decompresses to {len(data)} bytes but records "
                          f"{expected}: truncated or corrupt", path=path)
    return name, data


def lz4_legacy_decompress(payload: bytes, limit: int, *, path: str = "kernel") -> bytes:
    """Decode an LZ4 legacy-frame stream (as written by ``lz4 -l``), at most ``limit`` bytes."""
    src = memoryview(payload)
    if int.from_bytes(src[:4], "little") != LZ4_LEGACY_MAGIC:
        raise FormatError("not an LZ4 legacy stream", path=path)
    out = bytearray()
    pos = 4
    while pos + 4 <= len(src):
        size = int.from_bytes(src[pos : pos + 4], "little")
        if size == LZ4_LEGACY_MAGIC:  # a concatenated stream
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(src):
            # The kernel's appended uncompressed size (or other trailing data): the end.
            break
        block_start = len(out)
        _lz4_block(src[pos + 4 : pos + 4 + size], out, limit, path)
        if len(out) - block_start > LZ4_LEGACY_BLOCK_MAX:
            raise FormatError("LZ4 block decodes to more than 8 MiB", path=path, offset=pos)
        pos += 4 + size
    return bytes(out)


def _lz4_block(block: memoryview, out: bytearray, limit: int, path: str) -> None:
    """Append the decoding of one LZ4 block to ``out``. The block format: sequences of a token
    (literal length << 4 | match length - 4), literal length extension bytes, literals, a
    2-byte match offset, match length extension bytes; the last sequence has literals only."""
    i, end = 0, len(block)
    try:
        while True:
            token = block[i]
            i += 1
            literals = token >> 4
            if literals == 15:
                while True:
                    extra = block[i]
                    i += 1
                    literals += extra
                    if extra != 255:
                        break
            if literals:
                if i + literals > end:
                    raise FormatError("LZ4 literals run past the block", path=path)
                out += block[i : i + literals]
                i += literals
            if i >= end:
                return
            offset = block[i] | block[i + 1] << 8
            i += 2
            match = token & 15
            if match == 15:
                while True:
                    extra = block[i]
                    i += 1
                    match += extra
                    if extra != 255:
                        break
            match += 4
            start = len(out) - offset
            if offset == 0 or start < 0:
                raise FormatError(f"LZ4 match offset {offset} points before the output",
                                  path=path)
            if len(out) + match > limit:
                raise _too_big("lz4", limit, path)
            if offset >= match:
                out += out[start : start + match]
            else:
                # Overlapping copy: the match repeats the last ``offset`` bytes.
                pattern = out[start:]
                out += (pattern * (match // offset + 1))[:match]
    except IndexError:
        raise FormatError("LZ4 block is truncated", path=path) from None
