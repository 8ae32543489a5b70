"""What the child process does with one case, and the sandbox it does it in.

:func:`child_main` runs in a process forked for the case (see :mod:`.runner`). It limits its
own address space (``RLIMIT_AS``), arms a ``faulthandler`` watchdog that dumps every thread's
stack and exits when the time is up (so a hang still says where it hung), puts a pipe that
never delivers on stdin (``/dev/stdin`` then blocks as at a terminal), and installs an audit
hook that records every ``open`` outside the case directory and the interpreter's own files
(and refuses writes there; with ``follow_outside`` only the writes are findings). Then it
runs the case and writes one JSON line per event to the result file, which survives the child
being killed.

An image case does what ``vdiskfs info`` does -- open the tree (read-only, and with
``--no-follow-outside`` unless the case asks otherwise), describe it, scan the partition table
-- then reads the whole virtual disk (up to :data:`READ_CAP` bytes, the rest sampled), asks the
block status of a few ranges, and reads the start and end of every partition window, checking
that every read returns the length asked for.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import resource
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any

import trio

import vdiskfs.drivers  # noqa: F401  -- preloaded, so that forking a case costs no imports
from emulator.devices.virtio.block import device as _virtio_device  # noqa: F401
from tests.support.fuzz.mutate import CaseSpec
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.errors import VdiskError
from vdiskfs.info import format_text, image_info
from vdiskfs.partitions import open_window, scan_disk

__all__ = ["READ_CAP", "REPO", "ShortReadError", "child_main", "innermost_frame", "run_case"]

REPO = Path(__file__).resolve().parents[3]
#: Bytes of virtual disk read per case: all of a small disk; of a large one, the first half
#: of the cap and chunks sampled over the rest (always including the last).
READ_CAP = 16 << 20
CHUNK = 1 << 20
#: Project code: the frames that deduplicate findings.
PROJECT_DIRS = ("vdiskfs", "emulator")


class ShortReadError(AssertionError):
    """A read returned fewer (or more) bytes than asked: a driver bug, whatever the image."""


# -- the child -------------------------------------------------------------------------------------


def child_main(case_dir: str, result_path: str, stderr_path: str, timeout: float,
               memory_limit: int) -> None:
    """Entry point of the forked child (never returns normally: ``os._exit``)."""
    with open(result_path, "a", buffering=1) as results, open(stderr_path, "w") as err:
        os.dup2(err.fileno(), 2)
        os.dup2(err.fileno(), 1)
        read_end, _write_end = os.pipe()  # the write end stays open: reads block forever
        os.dup2(read_end, 0)
        faulthandler.enable(file=err)
        faulthandler.dump_traceback_later(timeout, exit=True, file=err)
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, 256 << 20))
        emit(results, event="start", main_thread=threading.get_ident())
        spec = CaseSpec.load(Path(case_dir))
        _install_audit_hook(Path(case_dir), spec.follow_outside, results)
        outcome = run_case(Path(case_dir), spec)
        emit(results, event="done", **outcome)
        faulthandler.cancel_dump_traceback_later()
    os._exit(0)


def emit(results: IO[str], **event: Any) -> None:
    results.write(json.dumps(event, default=str) + "\n")
    results.flush()


def run_case(case_dir: Path, spec: CaseSpec) -> dict[str, Any]:
    """Run one case; its outcome as a dict (``outcome``, ``type``, ``frame``, ``message``...)."""
    try:
        if spec.kind == "virtio":
            from tests.support.fuzz.virtio import run_virtio_case

            trio.run(run_virtio_case, spec.params)
        elif spec.kind == "selftest":
            _misbehave(case_dir, spec.params["do"])
        else:
            trio.run(_image_case, case_dir, spec)
    except VdiskError as exc:
        if spec.kind == "virtio":  # nothing may leave the device, not even a clean error
            return _failure("unexpected", exc)
        return {"outcome": "error", "type": type(exc).__name__,
                "message": " ".join(str(exc).split())[:500]}
    except MemoryError as exc:
        return _failure("memory", exc)
    except BaseException as exc:  # every other escape is the finding
        leaf = _single_leaf(exc)
        if isinstance(leaf, VdiskError) and spec.kind != "virtio":
            return {"outcome": "error", "type": type(leaf).__name__,
                    "message": " ".join(str(leaf).split())[:500]}
        if isinstance(leaf, MemoryError):
            return _failure("memory", leaf)
        return _failure("unexpected", leaf)
    return {"outcome": "ok"}


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _failure(outcome: str, exc: BaseException) -> dict[str, Any]:
    path, line = innermost_frame(exc.__traceback__)
    return {"outcome": outcome, "type": type(exc).__name__, "frame": path, "line": line,
            "message": " ".join(str(exc).split())[:500],
            "traceback": "".join(traceback.format_exception(exc))[-6000:]}


def innermost_frame(tb: Any) -> tuple[str, int]:
    """``("vdiskfs/…/file.py:function", line)`` of the innermost project frame."""
    found = ("", 0)
    for frame, line in traceback.walk_tb(tb):
        where = project_path(frame.f_code.co_filename)
        if where:
            found = (f"{where}:{frame.f_code.co_name}", line)
    return found


def project_path(filename: str) -> str:
    """``filename`` relative to the repository if it is project code, else ''."""
    try:
        rel = Path(filename).resolve().relative_to(REPO)
    except ValueError:
        return ""
    return rel.as_posix() if rel.parts and rel.parts[0] in PROJECT_DIRS else ""


def _misbehave(case_dir: Path, what: str) -> None:
    """Each way a case can go wrong, on purpose: the runner's own tests classify these."""
    if what == "modify":
        with open(case_dir / "victim", "ab") as f:
            f.write(b"!")
    elif what == "outside":
        with open("/etc/passwd", "rb") as f:
            f.read(1)
    elif what == "hang":
        os.read(0, 1)  # stdin is a pipe nobody writes
    elif what == "memory":
        _hog = bytearray(1 << 40)
    elif what == "crash":
        os.kill(os.getpid(), 9)
    elif what == "raise":
        raise KeyError("selftest")
    elif what == "refuse":
        raise VdiskError("refused on purpose", path="selftest")


# -- the image case --------------------------------------------------------------------------------


async def _image_case(case_dir: Path, spec: CaseSpec) -> None:
    options = OpenOptions(read_only=True, follow_outside=spec.follow_outside)
    node = await open_image(str(case_dir / spec.image), options)
    try:
        info = image_info(node, spec.image)
        table = await scan_disk(node)
        info["partitions"] = [(p.number, p.start, p.size, p.type, p.name) for p in
                              table.partitions]
        json.dumps(info, default=str)
        format_text({k: v for k, v in info.items() if k != "partitions"})
        rng = random.Random(spec.name)
        await _read_disk(node, rng)
        await _block_status(node, rng)
        for part in table.partitions[:8]:
            window = await open_window(node, part)
            try:
                await _read_exact(window, 0, min(4096, window.size))
                await _read_exact(window, max(0, window.size - 4096), min(4096, window.size))
            finally:
                await window.aclose()
    finally:
        await node.aclose()


async def _read_exact(node: BlockNode, offset: int, length: int) -> None:
    data = await node.pread(offset, length)
    if len(data) != length:
        raise ShortReadError(f"{node.label}: pread({offset:#x}, {length:#x}) returned "
                             f"{len(data):#x} bytes")


async def _read_disk(node: BlockNode, rng: random.Random) -> None:
    size = node.size
    if size <= READ_CAP:
        offsets = range(0, size, CHUNK)
    else:
        head = range(0, READ_CAP // 2, CHUNK)
        samples = sorted({rng.randrange(0, size) // CHUNK * CHUNK
                          for _ in range(READ_CAP // 2 // CHUNK)})
        offsets = [*head, *samples, (size - 1) // CHUNK * CHUNK]
    for offset in offsets:
        await _read_exact(node, offset, min(CHUNK, size - offset))
    # An unaligned read across a chunk boundary too.
    if size > 3:
        start = rng.randrange(size - 1)
        await _read_exact(node, start, min(size - start, rng.randrange(1, 3 * 4096)))


async def _block_status(node: BlockNode, rng: random.Random) -> None:
    if node.size <= 0:
        return
    for _ in range(4):
        offset = rng.randrange(node.size)
        length = min(node.size - offset, rng.choice((1, 512, 65536, 1 << 30)))
        _status, n = await node.block_status(offset, length)
        if not 0 < n <= length:
            raise ShortReadError(f"block_status({offset:#x}, {length:#x}) covered {n:#x} bytes")


# -- the audit hook --------------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _allowed_prefixes(case_dir: Path) -> tuple[str, ...]:
    prefixes = {os.path.realpath(case_dir) + os.sep}
    for base in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path):
        if base and os.path.isdir(base) and os.path.realpath(base) != "/":
            prefixes.add(os.path.realpath(base) + os.sep)
    for package in (*PROJECT_DIRS, "tests"):
        prefixes.add(str(REPO / package) + os.sep)
    prefixes.discard(str(REPO) + os.sep)  # the repository root itself is not a package
    prefixes |= {"/proc/self/", f"/proc/{os.getpid()}/", "/sys/", "/usr/lib/", "/lib/",
                 "/usr/share/zoneinfo/"}
    return tuple(sorted(prefixes))


def _install_audit_hook(case_dir: Path, follow_outside: bool, results: IO[str]) -> None:
    prefixes = _allowed_prefixes(case_dir)
    # "/": the file engine probes for cachestat(2) on the root directory.
    exact = {"/", "/dev/null", "/dev/urandom", "/dev/fuse", "/etc/localtime"}
    seen: set[str] = set()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not args or isinstance(args[0], int) or args[0] is None:
            return
        path = os.fsdecode(args[0])
        absolute = os.path.abspath(path)
        if absolute in exact or path in exact:
            return
        real = os.path.realpath(absolute)
        if real.startswith(prefixes) or (real + os.sep) in prefixes:
            return
        mode, flags = (args[1], args[2]) if len(args) >= 3 else (None, 0)
        writing = bool((flags or 0) & _WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
        if follow_outside and not writing:
            return  # QEMU's policy: a reference may name any file, to be read
        if absolute not in seen:
            seen.add(absolute)
            stack = traceback.extract_stack()[:-1]
            frame = next((f"{project_path(f.filename)}:{f.name}" for f in reversed(stack)
                          if project_path(f.filename)), "")
            emit(results, event="outside", path=absolute, real=real, writing=writing,
                 frame=frame, stack="".join(traceback.format_list(stack[-12:]))[-3000:])
        if writing:
            raise PermissionError(f"fuzz sandbox: write outside the case directory: {absolute}")

    sys.addaudithook(hook)
