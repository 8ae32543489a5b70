"""The ``vdiskfs`` command line: mount, unmount, info, create, boot.

Every error the stack raises on purpose is a :class:`~vdiskfs.errors.VdiskError` that names the
file and field; here it becomes one line on stderr and exit status 1. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from vdiskfs import __version__
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import driver_names, redact_url, url_scheme
from vdiskfs.drivers.filter.throttle_buckets import parse_throttle
from vdiskfs.errors import VdiskError
from vdiskfs.info import format_text, image_info
from vdiskfs.mountargs import MountRequest
from vdiskfs.partitions import scan_disk
from vdiskfs.units import parse_size
from vdiskfs.urlargs import RemoteOptions, add_remote_arguments, hide_credentials

__all__ = ["main"]

log = logging.getLogger("vdiskfs")

#: Seconds a background ``mount`` waits for its daemon to open every image and mount them
#: (``--timeout``). Opening reads only headers and tables, well under a second for sane
#: images; a minute means a file on a hung file system (or a log replay of a huge image).
READY_TIMEOUT = 60.0


def _build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of ``vdiskfs``; ``boot``'s own options only when ``argv`` runs ``boot``."""
    parser = argparse.ArgumentParser(
        prog="vdiskfs",
        description="Look inside virtual disks: mount images as raw files, inspect them.",
    )
    parser.add_argument("--version", action="version", version=f"vdiskfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        help="mount images as flat raw files",
        description="Show every IMAGE as MOUNTPOINT/<stem>.raw, its partitions as "
        "<stem>-part<N>.raw, its internal snapshots as <stem>@<name>.raw and every layer's "
        "statistics under MOUNTPOINT/stats/.",
    )
    mount.add_argument("paths", nargs="+", metavar="IMAGE... MOUNTPOINT")
    # What the mount does: MountRequest's fields declare their options.
    MountRequest.add_arguments(mount)
    # How the command runs it.
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="stay attached and log to stderr")
    mount.add_argument("--log-file", metavar="FILE", help="where the background daemon logs")
    mount.add_argument("--timeout", metavar="SECONDS", type=float, default=READY_TIMEOUT,
                       help="give up (and stop the daemon) when the images are not mounted "
                       f"after SECONDS (default {READY_TIMEOUT:g}; 0: wait for ever)")
    # The background daemon's: where it reports, and its request as JSON on stdin (its
    # MOUNTPOINT argument only names it in ps).
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--request-on-stdin", action="store_true", help=argparse.SUPPRESS)

    unmount = commands.add_parser(
        "unmount", aliases=["umount"], help="unmount and wait for the images to be closed"
    )
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    unmount.add_argument("-z", "--lazy", action="store_true",
                         help="detach now even if files are still open")

    create = commands.add_parser(
        "create", help="create a new image",
        description="Create a qcow2 or raw image, as qemu-img create does.",
    )
    create.add_argument("-f", "--format", dest="fmt", default="qcow2", choices=["qcow2", "raw"])
    create.add_argument("-b", "--backing", metavar="BACKING",
                        help="backing file, relative to the new image's directory unless "
                        "absolute (qcow2)")
    create.add_argument("-F", "--backing-format", metavar="FMT",
                        help="format of BACKING (probed and recorded when not given)")
    create.add_argument("-o", "--options", metavar="OPTIONS", action="append", default=[],
                        help="comma-separated key=value options: cluster_size, compat, "
                        "refcount_bits, extended_l2, lazy_refcounts, compression_type, "
                        "data_file, data_file_raw, preallocation")
    create.add_argument("file", metavar="FILE")
    create.add_argument("size", metavar="SIZE", nargs="?",
                        help="virtual size (suffixes k, M, G, T); default: the backing file's")

    boot = commands.add_parser(
        "boot", help="boot a Linux guest whose disks are served by the driver stack",
        description="Boot a Linux kernel under KVM with a serial console and every --disk as "
        "a virtio-blk device served by the vdiskfs stack.",
    )
    if _command(argv) == "boot":
        # boot's options are the emulator's, and importing it loads KVM, the virtio devices and
        # every driver: only a command line that boots pays for that (``vdiskfs unmount`` and
        # ``vdiskfs --help`` do not; ``vdiskfs boot --help`` does, and lists them).
        from emulator.cli import add_boot_arguments

        add_boot_arguments(boot)

    info = commands.add_parser("info", help="describe an image as qemu-img info does")
    info.add_argument("image", metavar="IMAGE")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--format", metavar="FMT", choices=driver_names(),
                      help="force the format instead of probing it")
    info.add_argument("--no-follow-outside", dest="follow_outside", action="store_false",
                      help="refuse backing files and extents outside the image's directory")
    add_remote_arguments(info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # this process's own command line
        hide_credentials()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _build_parser(argv).parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "mount": _cmd_mount,
        "unmount": _cmd_unmount,
        "umount": _cmd_unmount,
        "info": _cmd_info,
        "create": _cmd_create,
        "boot": _cmd_boot,
    }
    try:
        return handlers[args.command](args)
    except VdiskError as exc:
        print(f"vdiskfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _command(argv: Sequence[str]) -> str | None:
    # The sub-command is the first word that is not an option: ``vdiskfs`` itself takes only
    # --help and --version, neither of which takes a value.
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format=f"vdiskfs[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_mount(args: argparse.Namespace) -> int:
    # Lazy, as every command's own modules here: the daemon loads FUSE and, for --overlay, the
    # qcow2 driver; ``import vdiskfs.cli`` loads no format driver (tests/test_imports.py).
    from vdiskfs.fs.daemon import run_foreground, spawn_daemon

    if args.request_on_stdin:
        # A background mount's daemon (spawned below).
        request = MountRequest.from_json(sys.stdin.read())
    elif len(args.paths) < 2:
        raise VdiskError("mount needs at least one IMAGE and a MOUNTPOINT")
    else:
        *images, mountpoint = args.paths
        request = MountRequest.from_args(args, images, mountpoint)
    if request.throttle is not None:
        # Checked here, so that a bad option is an error on the terminal, not in a daemon.
        spec = parse_throttle(request.throttle)
        if spec.limits is None and spec.group is None:
            raise VdiskError("--throttle: give limits (e.g. bps-read=50M,iops-total=2000) "
                             "or group=NAME", errno=errno.EINVAL)
    if not args.foreground:
        # The whole request on the daemon's stdin, not as arguments: every user can read a
        # process's arguments (ps, /proc/PID/cmdline), and an IMAGE may be a URL with a
        # password in it.
        argv = ["--request-on-stdin", "--", os.path.abspath(request.mountpoint)]
        return spawn_daemon(argv, args.log_file, args.timeout or None,  # 0: no limit
                            stdin=request.to_json().encode())

    _setup_logging(request.debug)
    report = os.fdopen(args.ready_fd, "w", buffering=1) if args.ready_fd is not None else None

    def send(kind: str, text: str) -> None:
        if report is not None and not report.closed:
            report.write(f"{kind} {' '.join(text.splitlines())}\n")

    def ready() -> None:
        if report is not None:
            send("R", "")
            report.close()

    # Warnings reach the log; with a report pipe they reach the user's terminal too.
    warn = (lambda text: send("W", text)) if report is not None else None
    try:
        trio.run(lambda: run_foreground(request, ready=ready, warn=warn))
    except VdiskError as exc:
        send("E", str(exc))
        raise
    except Exception as exc:
        send("E", f"internal error: {exc!r}")
        raise
    finally:
        if report is not None and not report.closed:
            report.close()
    return 0


def _cmd_boot(args: argparse.Namespace) -> int:
    # Lazy for the start-up cost of the emulator (see _build_parser).
    from emulator.cli import run_boot

    return run_boot(args)


def _cmd_unmount(args: argparse.Namespace) -> int:
    # Lazy: FUSE (pyfuse3) only for the commands that mount or unmount.
    from vdiskfs.fs.mount import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    return 0


_CREATE_OPTIONS = {
    "cluster_size": "number",
    "compat": "str",
    "refcount_bits": "number",
    "extended_l2": "bool",
    "lazy_refcounts": "bool",
    "compression_type": "str",
    "data_file": "str",
    "data_file_raw": "bool",
    "preallocation": "str",
}


def _parse_create_options(texts: list[str], fmt: str) -> dict[str, Any]:
    allowed = _CREATE_OPTIONS if fmt == "qcow2" else {"preallocation": "str"}
    # Any: each value has the kind the table gives its key, which the keyword it becomes takes.
    out: dict[str, Any] = {}
    for item in ",".join(texts).split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in allowed or not sep:
            raise VdiskError(f"invalid {fmt} option {item!r}; valid: {', '.join(allowed)}")
        kind = allowed[key]
        if kind == "bool":
            if value not in ("on", "off", "true", "false"):
                raise VdiskError(f"option {key}: expected on or off, not {value!r}")
            out[key] = value in ("on", "true")
        elif kind == "number":
            out[key] = parse_size(value, what=key)
        else:
            out[key] = value
    return out


def _cmd_create(args: argparse.Namespace) -> int:
    options = _parse_create_options(args.options, args.fmt)
    if os.path.exists(args.file):
        raise VdiskError(f"{args.file}: already exists; refusing to overwrite it")

    async def backing_facts() -> tuple[int, str]:
        # The backing name is relative to the new image's directory, as qemu-img does it; a
        # URL (nbd://...) is taken as it is.
        path = args.backing
        if url_scheme(path) is None:
            path = os.path.join(os.path.dirname(os.path.abspath(args.file)), args.backing)
        node = await open_image(path, OpenOptions(format=args.backing_format))
        try:
            return node.size, node.driver
        finally:
            await node.aclose()

    size = parse_size(args.size) if args.size is not None else None
    backing_format = args.backing_format
    if args.backing is not None:
        if args.fmt != "qcow2":
            raise VdiskError(f"{args.fmt} images cannot have a backing file")
        backing_size, probed = trio.run(backing_facts)
        size = backing_size if size is None else size
        backing_format = backing_format or probed
    if size is None:
        raise VdiskError("create needs a SIZE (or a backing file to take it from)")

    # Lazy: a format driver, loaded only by the command that creates its images.
    if args.fmt == "raw":
        from vdiskfs.drivers.format.raw import create_raw

        trio.run(lambda: create_raw(args.file, size, **options))
    else:
        from vdiskfs.drivers.format.qcow2.create import create_qcow2

        trio.run(lambda: create_qcow2(args.file, size, backing_file=args.backing,
                                      backing_format=backing_format,
                                      **options))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    # Warnings (probed raw, damaged partition entries) are part of the output, via
    # node.warnings, rather than log lines.
    options = RemoteOptions.from_args(args).open_options(format=args.format,
                                                         follow_outside=args.follow_outside)

    async def collect() -> dict[str, object]:
        node = await open_image(args.image, options)
        try:
            # A URL's credentials never reach the output (the node's label is redacted too).
            info = image_info(node, redact_url(args.image))
            _add_snapshot_files(info, node, args.image)
            info.update(await _partition_info(node))
            if node.warnings:
                info["warnings"] = list(node.warnings)
            return info
        finally:
            await node.aclose()

    logging.getLogger("vdiskfs").setLevel(logging.ERROR)
    info = trio.run(collect)
    if args.json:
        json.dump(info, sys.stdout, indent=4)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(info))
    return 0


def _add_snapshot_files(info: dict[str, object], node: BlockNode, image: str) -> None:
    """Each internal snapshot's disk size and the file ``vdiskfs mount`` shows it as (its
    name, or its ID where the name is no safe file name)."""
    # Lazy: the daemon's module loads FUSE and the qcow2 driver (see _cmd_mount).
    from vdiskfs.fs.daemon import image_stem
    from vdiskfs.fs.tree import snapshot_file_names

    listed = info.get("snapshots")
    if not isinstance(listed, list):
        return
    snapshots = node.internal_snapshots()
    if not snapshots:
        # The list is the protocol's under a format with a snapshot table of its own (a
        # qcow2 without internal snapshots, kept in RBD): the mount shows the format's, as
        # QEMU does; the protocol's open by name (rbd:pool/image@snap).
        return
    names = snapshot_file_names(image_stem(image), snapshots)
    for entry, snapshot, name in zip(listed, snapshots, names, strict=True):
        entry["virtual-size"] = snapshot.size
        entry["mount-file"] = f"{name}.raw"


async def _partition_info(node: BlockNode) -> dict[str, object]:
    table = await scan_disk(node)
    if table.scheme is None:
        return {}
    return {
        "partitions": {
            "scheme": table.scheme,
            "sector-size": table.sector_size,
            "entries": [
                {
                    "number": p.number,
                    "start": p.start,
                    "size": p.size,
                    "type": p.type,
                    "type-name": p.type_name,
                    "name": p.name,
                    "guid": p.guid,
                    "bootable": p.bootable,
                }
                for p in table.partitions
            ],
        }
    }
