"""What the concurrency and cancellation tests share (issue 9): one small pre-filled image of
every writable format, the I/O engine a test's event loop uses, and the checks that nothing is
left in flight.

Every variant is 8 MiB and three sectors (a partial last cluster, grain or block), filled by
``qemu-io`` so that requests hit allocated, unallocated and zero clusters, compressed clusters
and a backing file; the expectation is always ``qemu-img convert -O raw`` of the same image.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.support.images import create, qemu_io, random_bytes, reference_raw
from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.protocol.engine import UringEngine, UringError, current_engine

__all__ = [
    "ENGINES",
    "SIZE",
    "VARIANTS",
    "Image",
    "Variant",
    "assert_nothing_in_flight",
    "assert_one_of_values",
    "build_templates",
    "copy_image",
    "file_nodes",
    "settle",
    "use_engine",
]

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB + 3 * 512
#: Every engine of ``VDISKFS_IO_ENGINE`` but ``auto`` (which is one of them).
ENGINES = ["io_uring", "threads", "inline"]
BLOCK_PREFILL = ("write -P 0xab 0 64k", "write -P 0x11 1900k 300k", "write -z 4M 64k",
                 "write -P 0x22 5M 1M")


@dataclass(frozen=True)
class Variant:
    fmt: str
    #: Cluster, grain or block size: what concurrent requests should share.
    unit: int
    #: Builds the image in an empty directory; returns its path.
    build: Callable[[Path], Path]
    #: qemu-img can check the format (it cannot check raw and vpc).
    checkable: bool = True


def _raw(d: Path) -> Path:
    path = d / "disk.raw"
    path.write_bytes(random_bytes(7, SIZE))
    return path


def _qcow2(d: Path) -> Path:
    # 4 KiB clusters: 8 MiB take four L2 tables and many refcount entries, all allocated here.
    path = create(d / "disk.qcow2", SIZE, cluster_size=4096)
    qemu_io(path, "write -P 0x21 1M 3M", "write -z 5M 1M", "write -P 0x22 7M 100k")
    return path


def _qcow2_chain(d: Path) -> Path:
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 4M", "write -P 0x12 6M 2M")
    # Smaller clusters than the base: a partial write copies from the backing file.
    path = create(d / "disk.qcow2", SIZE, cluster_size=16 * KiB, backing="base.qcow2",
                  backing_fmt="qcow2")
    qemu_io(path, "write -P 0x31 2M 1M", "write -z 6M 64k")
    return path


def _qcow2_compressed(d: Path) -> Path:
    path = create(d / "disk.qcow2", SIZE)
    qemu_io(path, "write -c -P 0x23 0 2M", "write -c -P 0x24 4M 1M", "write -P 0x25 6M 64k")
    return path


def _block_format(fmt: str, **options: object) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        path = create(d / f"disk.{fmt}", SIZE, fmt, **options)
        qemu_io(path, *BLOCK_PREFILL, fmt=fmt)
        return path

    return build


VARIANTS: dict[str, Variant] = {
    "raw": Variant("raw", 4 * KiB, _raw, checkable=False),
    "qcow2": Variant("qcow2", 4 * KiB, _qcow2),
    "qcow2-chain": Variant("qcow2", 16 * KiB, _qcow2_chain),
    "qcow2-compressed": Variant("qcow2", 64 * KiB, _qcow2_compressed),
    "vmdk": Variant("vmdk", 64 * KiB, _block_format("vmdk")),
    "vpc": Variant("vpc", 2 * MiB, _block_format("vpc"), checkable=False),
    "vhdx": Variant("vhdx", MiB, _block_format("vhdx", block_size="1M")),
    "vdi": Variant("vdi", MiB, _block_format("vdi")),
    "qed": Variant("qed", 16 * KiB, _block_format("qed", cluster_size=16 * KiB)),
}


@dataclass
class Image:
    path: Path
    fmt: str
    #: QEMU's raw view of the image (a test may update it to what the image must hold).
    reference: Path


def build_templates(root: Path) -> dict[str, Path]:
    """Each variant built in a directory of its own under ``root`` (with its backing file)."""
    out = {}
    for name, variant in VARIANTS.items():
        d = root / name
        d.mkdir()
        out[name] = variant.build(d)
    return out


def copy_image(templates: dict[str, Path], name: str, tmp_path: Path) -> Image:
    """A copy of the variant's directory under ``tmp_path``, and QEMU's raw view of it."""
    source = templates[name]
    d = tmp_path / name
    shutil.copytree(source.parent, d)
    path = d / source.name
    fmt = VARIANTS[name].fmt
    return Image(path, fmt, reference_raw(path, tmp_path / f"{name}.raw", fmt))


@functools.cache
def uring_available() -> bool:
    try:
        UringEngine().close()
    except UringError:
        return False
    return True


def use_engine(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Make the engine of this test's event loop (and of daemons it starts) ``engine``: the
    loop creates its engine when it opens its first file, from ``VDISKFS_IO_ENGINE``."""
    if engine == "io_uring" and not uring_available():
        pytest.skip("io_uring is unavailable here")
    monkeypatch.setenv("VDISKFS_IO_ENGINE", engine)


def file_nodes(node: BlockNode) -> list[BlockNode]:
    return [n for _depth, _role, n in node.walk() if n.driver == "file"]


def assert_nothing_in_flight(node: BlockNode) -> None:
    """No request in flight in any node of the tree, nor in the engine for any file node."""
    for _depth, role, child in node.walk():
        assert child.stats.in_flight == 0, (
            f"{role or 'root'} {child.driver}: {child.stats.in_flight} requests in flight")
        if child.driver == "file":
            assert child.counters.engine_in_flight == 0  # type: ignore[attr-defined]


async def settle(node: BlockNode, timeout: float = 10) -> None:
    """:func:`assert_nothing_in_flight`, and the engine's own count drains to zero (a read
    abandoned by a cancelled caller leaves the engine when its host I/O ends)."""
    assert_nothing_in_flight(node)
    engine = current_engine()
    with trio.fail_after(timeout):
        while engine.stats.in_flight:
            await trio.sleep(0.01)
    assert engine.stats.inflight_bytes == 0


def assert_one_of_values(got: bytes, where: int, *candidates: bytes, chunk: int = 512) -> None:
    """Each byte of ``got`` (read at ``where``) equals that byte of one of ``candidates``."""
    for start in range(0, len(got), chunk):
        piece = got[start : start + chunk]
        if any(piece == c[start : start + chunk] for c in candidates):
            continue
        for i in range(start, min(len(got), start + chunk)):
            assert any(got[i] == c[i] for c in candidates), (
                f"byte {where + i:#x} reads {got[i]:#x}, which no write put there")
