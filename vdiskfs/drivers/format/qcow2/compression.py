"""Decompressing one qcow2 cluster, bounded: a hostile stream never yields more than a cluster.

As QEMU's ``block/qcow2-threads.c``: zlib clusters are raw deflate streams with a 4 KiB window
(``inflateInit2(-12)``), zstd clusters are one or more zstd frames. The stored length comes from
the descriptor in whole 512-byte sectors, so the input may carry the start of the next compressed
cluster after this one's stream: decompression stops once it has produced exactly one cluster,
and producing less is an error.
"""

from __future__ import annotations

import zlib

import zstandard

from vdiskfs.drivers.format.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

__all__ = ["DecompressionError", "decompress_cluster"]

_ZLIB_WBITS = -12


class DecompressionError(ValueError):
    """The compressed data does not decode to exactly one cluster."""


def decompress_cluster(compression_type: int, data: bytes, cluster_size: int) -> bytes:
    """Decode ``data`` into exactly ``cluster_size`` bytes, allocating no more than that."""
    if compression_type == COMPRESSION_ZLIB:
        return _inflate(data, cluster_size)
    if compression_type == COMPRESSION_ZSTD:
        return _zstd(data, cluster_size)
    raise DecompressionError(f"unknown compression type {compression_type}")


def _inflate(data: bytes, cluster_size: int) -> bytes:
    try:
        # max_length bounds the output: a deflate bomb stops at one cluster.
        out = zlib.decompressobj(_ZLIB_WBITS).decompress(data, cluster_size)
    except zlib.error as exc:
        raise DecompressionError(f"zlib: {exc}") from None
    if len(out) != cluster_size:
        raise DecompressionError(
            f"zlib stream decodes to {len(out)} bytes, not a cluster of {cluster_size}"
        )
    return out


def _zstd(data: bytes, cluster_size: int) -> bytes:
    # A frame header may promise any content size; QEMU refuses a frame that holds more than the
    # cluster, and so does this (without allocating what it promises).
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"zstd: {exc}") from None
    if declared > cluster_size:  # CONTENTSIZE_UNKNOWN is -1
        raise DecompressionError(
            f"zstd frame declares {declared} bytes, more than a cluster of {cluster_size}"
        )
    # The stream reader produces at most what is asked for, across frames as QEMU's loop does.
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    parts: list[bytes] = []
    produced = 0
    try:
        while produced < cluster_size:
            chunk = reader.read(cluster_size - produced)
            if not chunk:
                break
            parts.append(chunk)
            produced += len(chunk)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"zstd: {exc}") from None
    if produced != cluster_size:
        raise DecompressionError(
            f"zstd stream decodes to {produced} bytes, not a cluster of {cluster_size}"
        )
    return parts[0] if len(parts) == 1 else b"".join(parts)
