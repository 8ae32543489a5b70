"""Write-zeroes and discard in every writable format, against QEMU: the same requests applied
with ``qemu-io -c 'write -z [-u] OFF LEN' -c 'discard OFF LEN'`` to one copy of an image and
through vdiskfs to another; then ``qemu-img compare`` finds them equal and ``qemu-img check``
finds nothing wrong with ours. Each copy is a whole directory, so that backing files, external
data files and extents named relatively stay with their image.

What QEMU does, and so vdiskfs: raw punches holes (``fallocate``); qcow2 marks zero clusters
and subclusters, frees discarded clusters (v2 with a backing file ignores discards); qed marks
zero clusters; vmdk writes zeroed-grain entries where the extent has them; vdi, vpc and vhdx
write zeros, and none of qed, vmdk, vdi, vpc and vhdx can discard (a discard there is no
error and changes nothing). Then the bad requests: ranges past the end and negative offsets get
errors carrying an errno, unaligned ranges are served."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.images import QEMU_IMG, QEMU_IO, info, run
from tests.support.workload import assert_clean
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.errors import NoSpaceError, RangeError, ReadOnlyError

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB

#: name -> (format, ``qemu-img create -o`` options, backing file format or None). Images with
#: a backing file get one of the same size, filled with 0x11.
CONFIGS: dict[str, tuple[str, str, str | None]] = {
    "raw": ("raw", "", None),
    "qcow2-v2": ("qcow2", "compat=0.10", None),
    "qcow2-v3": ("qcow2", "compat=1.1", None),
    "qcow2-extended_l2": ("qcow2", "extended_l2=on", None),
    "qcow2-v2-backing": ("qcow2", "compat=0.10", "qcow2"),
    "qcow2-v3-backing": ("qcow2", "compat=1.1", "raw"),
    "qcow2-extended_l2-backing": ("qcow2", "extended_l2=on,cluster_size=128k", "qcow2"),
    "qcow2-4k-lazy": ("qcow2", "cluster_size=4k,lazy_refcounts=on", None),
    "qcow2-data_file": ("qcow2", "data_file=disk.data", None),
    "qcow2-data_file_raw": ("qcow2", "data_file=disk.data,data_file_raw=on", None),
    "qed": ("qed", "", None),
    "qed-backing": ("qed", "", "raw"),
    "vmdk": ("vmdk", "", None),
    "vmdk-zeroed_grain": ("vmdk", "zeroed_grain=on", None),
    "vmdk-backing": ("vmdk", "", "vmdk"),
    "vmdk-zeroed_grain-backing": ("vmdk", "zeroed_grain=on", "vmdk"),
    "vmdk-flat": ("vmdk", "subformat=monolithicFlat", None),
    "vmdk-split": ("vmdk", "subformat=twoGbMaxExtentSparse", None),
    "vpc": ("vpc", "", None),
    "vpc-fixed": ("vpc", "subformat=fixed", None),
    "vhdx": ("vhdx", "block_size=1M", None),
    "vhdx-fixed": ("vhdx", "subformat=fixed", None),
    "vdi": ("vdi", "", None),
    "vdi-static": ("vdi", "static=on", None),
}
#: QEMU cannot check these formats.
NO_CHECK = {"raw", "vpc"}
#: Where QEMU is wrong: ``(start, end, why)`` of the guest range where vdiskfs reads zeros.
QEMU_DIFFERS = {
    "qed-backing": (
        5 * MiB + 512 * KiB + 4096, 5 * MiB + 576 * KiB,
        "QEMU's qed_aio_write_cow fills a new cluster from the backing file even when it "
        "replaces a zero cluster: the 4 KiB written into the zeroed cluster at 5.5 MiB "
        "brings the backing file's bytes back around it; vdiskfs keeps the zeros"),
}


def _tool(cwd: Path, *args: str) -> str:
    """Run qemu-img or qemu-io in ``cwd`` (relative names in options resolve there)."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _qemu_io(image: Path, fmt: str, commands: list[str]) -> None:
    args = [QEMU_IO, "-f", fmt]
    for command in commands:
        args += ["-c", command]
    _tool(image.parent, *args, image.name)


def _build(directory: Path, name: str) -> tuple[Path, str, int]:
    """The image of ``name`` in ``directory``, holding data here and there; its format and
    virtual size (vpc rounds it to a disk geometry)."""
    fmt, options, backing_fmt = CONFIGS[name]
    directory.mkdir()
    image = directory / f"disk.{fmt}"
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing_fmt is not None:
        base = f"base.{backing_fmt}"
        _tool(directory, QEMU_IMG, "create", "-q", "-f", backing_fmt, base, str(SIZE))
        _qemu_io(directory / base, backing_fmt, [f"write -q -P 0x11 0 {SIZE}"])
        args += ["-b", base, "-F", backing_fmt]
    if options:
        args += ["-o", options]
    _tool(directory, *args, image.name, str(SIZE))
    size = int(info(image, "-f", fmt)["virtual-size"])
    _qemu_io(image, fmt, [
        "write -q -P 0x5a 0 3M",
        f"write -q -P 0x5b {5 * MiB + 4096} {200 * KiB}",
        f"write -q -P 0x5c {size - 100 * KiB} {100 * KiB}",
    ])
    return image, fmt, size


def _requests(size: int) -> list[tuple[str, int, int, int]]:
    """``(verb, offset, length, pattern)``: "zero", "zero-unmap", "discard" or "write"."""
    return [
        ("zero", 0, 64 * KiB, 0),  # whole clusters of data, kept
        ("zero-unmap", 64 * KiB, 128 * KiB, 0),  # given back where the format can
        ("zero", 100, 1000, 0),  # inside data
        ("zero", 3 * MiB - 1000, 1200 * KiB, 0),  # data into unallocated, unaligned
        ("zero-unmap", 6 * MiB + 512, 5000, 0),  # unallocated: nothing to do
        ("discard", 1 * MiB, 1 * MiB, 0),  # whole clusters
        ("discard", 2 * MiB + 100, 300 * KiB, 0),  # unaligned ends ignored
        ("write", 1 * MiB + 4096, 8192, 0x77),  # into what was discarded
        ("zero-unmap", 5 * MiB, 1 * MiB, 0),
        ("write", 5 * MiB + 512 * KiB, 4096, 0x78),
        ("discard", 5 * MiB + 256 * KiB, 128 * KiB, 0),
        ("zero-unmap", size - 5000, 5000, 0),  # to the end of the disk
        ("discard", size - 70_000, 70_000, 0),
        ("write", size - 40 * KiB, 512, 0x79),
        ("discard", 0, 64 * KiB, 0),  # a zero cluster, discarded
    ]


def _qemu_commands(requests: list[tuple[str, int, int, int]]) -> list[str]:
    commands = []
    for verb, offset, length, pattern in requests:
        if verb == "write":
            commands.append(f"write -q -P {pattern:#x} {offset} {length}")
        elif verb == "discard":
            commands.append(f"discard -q {offset} {length}")
        else:
            unmap = "-u " if verb == "zero-unmap" else ""
            commands.append(f"write -q -z {unmap}{offset} {length}")
    return commands


async def _apply(node: BlockNode, requests: list[tuple[str, int, int, int]]) -> None:
    for verb, offset, length, pattern in requests:
        if verb == "write":
            await node.pwrite(offset, bytes([pattern]) * length)
        elif verb == "discard":
            await node.discard(offset, length)
        else:
            await node.zero(offset, length, may_unmap=verb == "zero-unmap")


@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_zero_and_discard_as_qemu(name: str, tmp_path: Path) -> None:
    image, fmt, size = _build(tmp_path / "src", name)
    shutil.copytree(tmp_path / "src", tmp_path / "qemu")
    shutil.copytree(tmp_path / "src", tmp_path / "ours")
    ours = tmp_path / "ours" / image.name
    theirs = tmp_path / "qemu" / image.name
    requests = _requests(size)
    _qemu_io(theirs, fmt, _qemu_commands(requests))
    node = await open_image(str(ours), OpenOptions(read_only=False, format=fmt))
    try:
        assert node.size == size
        await _apply(node, requests)
        # The node's own view agrees before anything is written back.
        view = bytes(await node.pread(0, size))
    finally:
        await node.aclose()
    if fmt not in NO_CHECK:
        assert_clean(ours, fmt)
    # QEMU opens an external data file relative to its working directory, not the image's:
    # each image is read from its own directory.
    got, want = _as_raw(ours, fmt), _as_raw(theirs, fmt)
    assert got == view
    if "data_file_raw" in name:
        assert (ours.parent / "disk.data").read_bytes() == view  # still the same disk
    if name in QEMU_DIFFERS:
        start, end, why = QEMU_DIFFERS[name]
        assert got[:start] == want[:start] and got[end:] == want[end:], why
        assert got[start:end] == bytes(end - start) and want[start:end] != got[start:end], why
    elif "data_file" in name:
        assert got == want
    else:
        run(QEMU_IMG, "compare", "-q", "-f", fmt, "-F", fmt, theirs, ours)


def _as_raw(image: Path, fmt: str) -> bytes:
    raw = image.with_name("guest.raw")
    _tool(image.parent, QEMU_IMG, "convert", "-f", fmt, "-O", "raw", image.name, raw.name)
    return raw.read_bytes()


@pytest.mark.parametrize("name", ["raw", "qcow2-v3", "qcow2-extended_l2", "qed", "vmdk",
                                  "vpc", "vhdx", "vdi"])
async def test_bad_zero_and_discard_requests_get_errnos(name: str, tmp_path: Path) -> None:
    image, fmt, size = _build(tmp_path / "src", name)
    node = await open_image(str(image), OpenOptions(read_only=False, format=fmt))
    try:
        before = bytes(await node.pread(0, size))
        for verb in (node.zero, node.discard):
            for offset, length in ((size, 1), (size - 10, 20), (size + 4096, 4096)):
                with pytest.raises(NoSpaceError, match="past the end") as past:
                    await verb(offset, length)
                assert past.value.errno == errno.ENOSPC
            with pytest.raises(RangeError) as negative:
                await verb(-512, 1024)
            assert negative.value.errno == errno.EINVAL
            await verb(size, 0)  # empty, at the end: nothing
        assert bytes(await node.pread(0, size)) == before
        # Unaligned discards are served: what they cannot deallocate stays as it was.
        await node.discard(123, 4567)
        after = bytes(await node.pread(0, size))
        assert after[:123] == before[:123] and after[4690:] == before[4690:]
        assert after[123:4690] in (before[123:4690], bytes(4567))
    finally:
        await node.aclose()
    if fmt not in NO_CHECK:
        assert_clean(image, fmt)
    node = await open_image(str(image), OpenOptions(format=fmt))
    try:
        for verb in (node.zero, node.discard):
            with pytest.raises(ReadOnlyError) as refused:
                await verb(0, 4096)
            assert refused.value.errno == errno.EROFS
    finally:
        await node.aclose()
