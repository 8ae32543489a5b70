"""Opening the files that images name (issue 10): every reference position -- qcow2 backing
file and external data file, qed backing file, vmdk extent, VHD parent, VHDX parent -- refuses
a FIFO, a socket, a character device, a directory and ``/dev/stdin`` at once, with an error
naming the referring image and field, through the open API and through ``vdiskfs info``; any
other failure to open a child names the chain too, whatever its errno."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.support.hostile import patch
from tests.support.images import create, qemu_img
from tests.support.vhdx_build import DiffSpec, build_differencing
from tests.support.vmdk_images import write_descriptor
from tests.support.vpc_images import Locator, VhdSpec, build_vhd
from vdiskfs.block import registry
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.registry import FORMAT_MODULES, driver_names, get_driver
from vdiskfs.errors import FormatError, HostIOError, NotADiskError, VdiskError

MiB = 1 << 20

# -- the positions: each builds an image in a directory naming ``reference`` there -------------


def qcow2_backing(d: Path, reference: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", reference, "-F", "raw", d / "top.qcow2",
             "1M")
    return d / "top.qcow2"


def qcow2_data_file(d: Path, reference: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'made.data'}",
             d / "disk.qcow2", "1M")
    (d / "made.data").unlink()
    _set_data_file_name(d / "disk.qcow2", reference)
    return d / "disk.qcow2"


def _set_data_file_name(image: Path, name: str) -> None:
    """Rewrite the header extensions of ``image`` with ``name`` as its external data file."""
    data = bytearray(image.read_bytes())
    header_length = struct.unpack_from(">I", data, 100)[0]
    offset, kept = header_length, b""
    while True:
        magic, length = struct.unpack_from(">II", data, offset)
        if magic == 0:
            break
        padded = length + (-length % 8)
        if magic != 0x44415441:  # everything but the data file name stays
            kept += bytes(data[offset : offset + 8 + padded])
        offset += 8 + padded
    raw = os.fsencode(name)
    area = kept + struct.pack(">II", 0x44415441, len(raw)) + raw + bytes(-len(raw) % 8)
    area += bytes(8)  # the end marker
    assert header_length + len(area) <= 64 * 1024
    data[header_length : header_length + len(area)] = area
    image.write_bytes(bytes(data))


def qed_backing(d: Path, reference: str) -> Path:
    qemu_img("create", "-q", "-f", "qed", "-u", "-b", reference, "-F", "raw", d / "top.qed", "1M")
    return d / "top.qed"


def vmdk_extent(d: Path, reference: str) -> Path:
    return write_descriptor(d / "disk.vmdk", create_type="monolithicFlat",
                            extents=[f'RW 2048 FLAT "{reference}" 0'])


def vhd_parent(d: Path, reference: str) -> Path:
    spec = VhdSpec(size=MiB, disk_type=4, parent_uuid=uuid.uuid4(), parent_name=reference,
                   locators=[Locator(b"W2ru", reference.encode("utf-16-le"))])
    return build_vhd(d / "child.vhd", spec, {})


def vhdx_parent(d: Path, reference: str) -> Path:
    spec = DiffSpec(virtual_size=MiB, locator={
        "parent_linkage": "{" + str(uuid.uuid4()) + "}", "relative_path": reference})
    build_differencing(d / "child.vhdx", spec)
    return d / "child.vhdx"


#: position -> (builder, the field the error names).
POSITIONS: dict[str, tuple[Callable[[Path, str], Path], str]] = {
    "qcow2-backing": (qcow2_backing, "backing_file"),
    "qcow2-data-file": (qcow2_data_file, "data_file"),
    "qed-backing": (qed_backing, "backing_filename"),
    "vmdk-extent": (vmdk_extent, "extent 1 (line 8)"),
    "vhd-parent": (vhd_parent, "parent_locator"),
    "vhdx-parent": (vhdx_parent, "parent_locator.relative_path"),
}

# -- the special files: each made at a path; what the error calls it ------------------------------


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # the file stays after close
    sock.close()


def make_char_device(path: Path) -> None:
    path.symlink_to("/dev/null")


def make_directory(path: Path) -> None:
    path.mkdir()


def make_stdin(path: Path) -> None:
    # /dev/stdin of the process that opens: a pipe for `vdiskfs info` below, the terminal or
    # /dev/null under pytest -- never a disk.
    path.symlink_to("/dev/stdin")


KINDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (make_fifo, "a FIFO"),
    "socket": (make_socket, "a socket"),
    "char-device": (make_char_device, "a character device"),
    "directory": (make_directory, "a directory"),
    "stdin": (make_stdin, "a FIFO|a character device|a socket"),
}


@pytest.fixture(params=list(POSITIONS))
def position(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def hostile(tmp_path: Path, position: str, kind: str) -> Iterator[Path]:
    """An image of ``position`` whose reference ``target`` is a special file of ``kind``."""
    build, _field = POSITIONS[position]
    image = build(tmp_path, "target")
    KINDS[kind][0](tmp_path / "target")
    yield image


async def test_special_file_refused_by_the_open_api(hostile: Path, position: str,
                                                    kind: str) -> None:
    if kind == "stdin" and _stdin_is_a_disk():
        pytest.skip("this test run's stdin is a regular file")
    with trio.fail_after(1), pytest.raises(NotADiskError, match=KINDS[kind][1]) as info:
        node = await open_image(str(hostile))
        await node.aclose()
    exc = info.value
    assert exc.path == str(hostile) and exc.field == POSITIONS[position][1], exc
    assert "'target'" in exc.message and "not a disk image" in exc.message
    assert exc.errno == (errno.EISDIR if kind == "directory" else errno.ENODEV)


def test_special_file_refused_by_info(hostile: Path, position: str, kind: str) -> None:
    # stdin: a pipe that nobody writes, the case that hung for ever before issue 10.
    proc = subprocess.run([sys.executable, "-m", "vdiskfs", "info", str(hostile)],
                          stdin=subprocess.PIPE, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"vdiskfs: {hostile}: field {POSITIONS[position][1]}: "), line
    assert "not a disk image" in line and "Traceback" not in proc.stderr


def _stdin_is_a_disk() -> bool:
    try:
        return os.path.isfile("/dev/stdin")
    except OSError:
        return False


async def test_issue_recipe_fifo_backing_file(tmp_path: Path) -> None:
    """The issue's recipe: a qcow2 v3 whose backing name, written at 0x400, is a FIFO beside it.
    Before the fix `vdiskfs info` blocked for ever in os.open."""
    image = create(tmp_path / "top.qcow2", MiB)
    patch(image, 0x400, "4s", b"fifo")
    patch(image, 8, ">QI", 0x400, 4)
    os.mkfifo(tmp_path / "fifo")
    with trio.fail_after(1), pytest.raises(NotADiskError) as info:
        await open_image(str(image))
    assert str(info.value) == (
        f"{image}: field backing_file: backing file 'fifo' ({tmp_path / 'fifo'}): a FIFO "
        "(named pipe), not a disk image (only regular files and block devices are opened)")


async def test_vmdk_extent_named_dev_stdin(tmp_path: Path) -> None:
    """The issue's other case: an extent literally named /dev/stdin names its field."""
    if _stdin_is_a_disk():
        pytest.skip("this test run's stdin is a regular file")
    image = vmdk_extent(tmp_path, "/dev/stdin")
    with trio.fail_after(1), pytest.raises(NotADiskError) as info:
        await open_image(str(image))
    assert info.value.path == str(image) and info.value.field == "extent 1 (line 8)"
    assert "extent file '/dev/stdin':" in info.value.message


async def test_the_top_image_itself_is_checked(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "image")
    with trio.fail_after(1), pytest.raises(NotADiskError, match="a FIFO") as info:
        await open_image(str(tmp_path / "image"))
    assert info.value.path == str(tmp_path / "image") and info.value.field is None


# -- every errno names the chain -----------------------------------------------------------------


def _name_too_long(d: Path) -> str:
    return "x" * 300


def _symlink_loop(d: Path) -> str:
    (d / "loop").symlink_to("loop")
    return "loop"


def _not_a_directory(d: Path) -> str:
    (d / "plain").write_bytes(b"")
    return "plain/target"


def _dangling_symlink(d: Path) -> str:
    (d / "dangling").symlink_to("nowhere")
    return "dangling"


#: How a reference fails -> (makes it in a directory and returns it, errno, message part).
FAILURES: dict[str, tuple[Callable[[Path], str], int, str]] = {
    "ENAMETOOLONG": (_name_too_long, errno.ENAMETOOLONG, "File name too long"),
    "ELOOP": (_symlink_loop, errno.ELOOP, "Too many levels of symbolic links"),
    "ENOTDIR": (_not_a_directory, errno.ENOTDIR, "Not a directory"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_open_errors_name_the_image_and_field(tmp_path: Path, position: str,
                                                    failure: str) -> None:
    make, err, text = FAILURES[failure]
    reference = make(tmp_path)
    image = POSITIONS[position][0](tmp_path, reference)
    with trio.fail_after(1), pytest.raises(HostIOError) as info:
        await open_image(str(image))
    exc = info.value
    assert exc.errno == err and exc.path == str(image), exc
    assert exc.field == POSITIONS[position][1], exc
    assert f"file {reference!r} ({tmp_path / reference}): cannot open: {text}" in exc.message


async def test_missing_child_names_the_chain(tmp_path: Path, position: str) -> None:
    reference = _dangling_symlink(tmp_path)
    image = POSITIONS[position][0](tmp_path, reference)
    with pytest.raises(VdiskError) as info:
        await open_image(str(image))
    exc = info.value
    # A VHDX parent is looked for under each of its locator's paths: "not found" names all.
    field = "parent_locator" if position == "vhdx-parent" else POSITIONS[position][1]
    assert exc.path == str(image) and exc.field == field, exc
    assert "not found" in exc.message


async def test_unknown_backing_format_names_the_field(tmp_path: Path) -> None:
    """A backing-format extension of length 1 ("r") said `unknown format 'r'`, naming neither
    the image nor the field (issue 10)."""
    create(tmp_path / "base.raw", MiB, "raw")
    top = create(tmp_path / "top.qcow2", MiB, backing="base.raw", backing_fmt="raw")
    at = top.read_bytes().index(struct.pack(">I", 0xE2792ACA))
    patch(top, at + 4, ">I", 1)
    with pytest.raises(VdiskError, match=r"backing file 'base\.raw': unknown format 'r'") as info:
        await open_image(str(top))
    assert info.value.path == str(top) and info.value.field == "backing format extension"


async def test_empty_reference_is_refused_by_name(tmp_path: Path) -> None:
    image = vmdk_extent(tmp_path, "target")
    image.write_text(image.read_text().replace('"target"', '""'))
    with pytest.raises(FormatError, match="extent without a file name"):
        await open_image(str(image), OpenOptions())


def test_the_table_lists_every_format_driver() -> None:
    # driver_names() answers from the table without loading a driver; once they are loaded,
    # the names they registered must be exactly the table's.
    names = driver_names()
    for name in names:
        cls = get_driver(name)
        assert cls.driver == name
        assert cls.__module__.startswith(FORMAT_MODULES[name])
    assert sorted(registry._FORMATS) == names
