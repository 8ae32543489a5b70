"""The ``vdiskfs`` command line: mount, unmount, info.

Every error the stack raises on purpose is a :class:`~vdiskfs.errors.VdiskError` that names the
file and field; here it becomes one line on stderr and exit status 1. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

import trio

from vdiskfs import __version__
from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import OpenOptions, driver_names, open_image
from vdiskfs.errors import VdiskError

__all__ = ["main"]

log = logging.getLogger("vdiskfs")


def _build_parser() -> argparse.ArgumentParser:
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
        "<stem>-part<N>.raw and every layer's statistics under MOUNTPOINT/stats/.",
    )
    mount.add_argument("paths", nargs="+", metavar="IMAGE... MOUNTPOINT")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="stay attached and log to stderr")
    mount.add_argument("--format", metavar="FMT", choices=driver_names(),
                       help="force the format of every IMAGE instead of probing it")
    mount.add_argument("--no-partitions", dest="partitions", action="store_false",
                       help="do not show partition files")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users access the mount (FUSE allow_other)")
    mount.add_argument("--no-follow-outside", dest="follow_outside", action="store_false",
                       help="refuse backing files and extents outside the image's directory")
    mount.add_argument("--log-file", metavar="FILE", help="where the background daemon logs")
    mount.add_argument("--debug", action="store_true", help="log every FUSE request")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    unmount = commands.add_parser(
        "unmount", aliases=["umount"], help="unmount and wait for the images to be closed"
    )
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    unmount.add_argument("-z", "--lazy", action="store_true",
                         help="detach now even if files are still open")

    info = commands.add_parser("info", help="describe an image as qemu-img info does")
    info.add_argument("image", metavar="IMAGE")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--format", metavar="FMT", choices=driver_names(),
                      help="force the format instead of probing it")
    info.add_argument("--no-follow-outside", dest="follow_outside", action="store_false",
                      help="refuse backing files and extents outside the image's directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "mount": _cmd_mount,
        "unmount": _cmd_unmount,
        "umount": _cmd_unmount,
        "info": _cmd_info,
    }
    try:
        return handlers[args.command](args)
    except VdiskError as exc:
        print(f"vdiskfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format=f"vdiskfs[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_mount(args: argparse.Namespace) -> int:
    from vdiskfs.fs.daemon import MountRequest, run_foreground, spawn_daemon

    if len(args.paths) < 2:
        raise VdiskError("mount needs at least one IMAGE and a MOUNTPOINT")
    *images, mountpoint = args.paths
    if not args.foreground:
        return spawn_daemon(argv_of(args), args.log_file)

    request = MountRequest(
        images=images,
        mountpoint=mountpoint,
        format=args.format,
        partitions=args.partitions,
        allow_other=args.allow_other,
        follow_outside=args.follow_outside,
        debug=args.debug,
    )
    _setup_logging(args.debug)
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


def argv_of(args: argparse.Namespace) -> list[str]:
    """The mount arguments to hand to the background daemon."""
    argv: list[str] = []
    if args.format:
        argv += ["--format", args.format]
    if not args.partitions:
        argv.append("--no-partitions")
    if args.allow_other:
        argv.append("--allow-other")
    if not args.follow_outside:
        argv.append("--no-follow-outside")
    if args.debug:
        argv.append("--debug")
    # Paths become absolute: the daemon must not depend on the caller's directory.
    argv.append("--")
    argv += [os.path.abspath(p) for p in args.paths]
    return argv


def _cmd_unmount(args: argparse.Namespace) -> int:
    from vdiskfs.fs.mount import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from vdiskfs.info import format_text, image_info

    warnings: list[str] = []
    options = OpenOptions(
        format=args.format, follow_outside=args.follow_outside, warn=warnings.append
    )

    async def collect() -> dict[str, object]:
        node = await open_image(args.image, options)
        try:
            info = image_info(node, args.image)
            info.update(await _partition_info(node))
            if node.warnings:
                info["warnings"] = list(node.warnings)
            return info
        finally:
            await node.aclose()

    logging.getLogger("vdiskfs").setLevel(logging.ERROR)  # warnings are part of the output
    info = trio.run(collect)
    if args.json:
        json.dump(info, sys.stdout, indent=4)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(info))
    return 0


async def _partition_info(node: BlockNode) -> dict[str, object]:
    from vdiskfs.partitions import read_partition_table

    table = await read_partition_table(node, label=node.label)
    node.warnings.extend(table.warnings)
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
