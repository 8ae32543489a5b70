"""bzImage payload decompression: every compression a kernel build can choose, bounded."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess

import pytest
import zstandard

from emulator.loader.decompress import decompress, lz4_legacy_decompress
from vdiskfs.errors import FormatError, UnsupportedError


def _sample() -> bytes:
    # Compressible text, a long run (overlapping LZ4 matches), incompressible bytes.
    text = b"".join(b"line %d of the kernel image\n" % i for i in range(4000))
    return text + b"\0" * 70000 + b"ab" * 5000 + os.urandom(30000) + text[:1000]


SAMPLE = _sample()
SIZE_TRAILER = struct.pack("<I", len(SAMPLE))


def _lz4_legacy(data: bytes) -> bytes:
    tool = shutil.which("lz4")
    if tool is None:
        pytest.skip("lz4 tool not installed")
    return subprocess.run([tool, "-l", "-12", "-c"], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("gzip", gzip.compress),
        ("xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                       filters=[{"id": lzma.FILTER_X86},
                                                {"id": lzma.FILTER_LZMA2}])),
        ("lzma", lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)),
        ("bzip2", bz2.compress),
        ("zstd", lambda d: zstandard.ZstdCompressor(level=19).compress(d)),
        ("lz4", _lz4_legacy),
    ],
)
def test_each_compression(name: str, compress: object) -> None:
    payload = compress(SAMPLE) + SIZE_TRAILER  # type: ignore[operator]
    found, data = decompress(payload, 1 << 24)
    assert found == name
    assert data == SAMPLE


def test_lz4_multiple_blocks() -> None:
    big = SAMPLE * 40  # > 8 MiB: several legacy blocks
    assert lz4_legacy_decompress(_lz4_legacy(big) + SIZE_TRAILER, 1 << 26) == big


def test_output_is_bounded() -> None:
    for payload in (gzip.compress(SAMPLE), _lz4_legacy(SAMPLE)):
        with pytest.raises(FormatError, match="more than"):
            decompress(payload, 1000)


def test_corrupt_and_unknown_payloads() -> None:
    with pytest.raises(FormatError, match="corrupt"):
        decompress(gzip.compress(SAMPLE)[:20] + b"\xff" * 50, 1 << 24)
    for compress in (lambda d: zstandard.ZstdCompressor().compress(d), _lz4_legacy, bz2.compress):
        truncated = compress(SAMPLE)[:-200] + SIZE_TRAILER
        with pytest.raises(FormatError, match=r"truncated|corrupt"):
            decompress(truncated, 1 << 24)
    with pytest.raises(FormatError, match="unknown"):
        decompress(b"\x00\x01\x02\x03" * 4, 1 << 24)
    with pytest.raises(UnsupportedError, match="LZO"):
        decompress(b"\x89LZO\x00\r\n" + bytes(20), 1 << 24)


@pytest.mark.parametrize(
    "block",
    [
        b"\x1f",  # a token promising more literals than there are
        b"\x00\x05\x00",  # a match reaching before the output
        b"\x10a\x00\x00",  # offset zero
        b"\xf0",  # a literal-length extension missing
    ],
)
def test_hostile_lz4_blocks(block: bytes) -> None:
    stream = struct.pack("<II", 0x184C2102, len(block)) + block
    with pytest.raises(FormatError):
        lz4_legacy_decompress(stream, 1 << 20)
