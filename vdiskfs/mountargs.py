"""What ``vdiskfs mount`` is asked to do, declared once: each field of :class:`MountRequest`
carries its command-line option (:mod:`vdiskfs.cliopts`), so the parser, the request built from
the parsed arguments and the request handed to the background daemon (as JSON on its stdin)
all follow from the fields. A new mount option is a new field (and its lines in the man page
and the README).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from vdiskfs.block.registry import driver_names
from vdiskfs.cliopts import NESTED, add_options, from_args, from_plain, option, path, to_plain
from vdiskfs.urlargs import RemoteOptions

__all__ = ["MountRequest"]


@dataclass(frozen=True)
class MountRequest:
    #: The IMAGE and MOUNTPOINT arguments (the only ones without an option).
    images: list[str] = field(metadata=path())
    mountpoint: str = field(metadata=path())
    format: str | None = field(default=None, metadata=option(
        "--format", metavar="FMT", choices=driver_names(),
        help="force the format of every IMAGE instead of probing it"))
    writable: bool = field(default=False, metadata=option(
        "--rw", action="store_true", exclusive="mode",
        help="make the raw files writable; writes go into the images"))
    #: A qcow2 file that takes the writes; the single IMAGE becomes its read-only backing file.
    overlay: str | None = field(default=None, metadata=option(
        "--overlay", metavar="NEW.qcow2", exclusive="mode", path=True,
        help="writes go into NEW.qcow2 (created over IMAGE if missing, continued if it "
        "exists); IMAGE stays untouched"))
    partitions: bool = field(default=True, metadata=option(
        "--no-partitions", action="store_false", help="do not show partition files"))
    #: Show every internal snapshot as ``<stem>@<name>.raw``; None: on read-only mounts only
    #: (:attr:`show_snapshots`).
    snapshots: bool | None = field(default=None, metadata=option(
        "--snapshots", action=argparse.BooleanOptionalAction,
        help="show every internal snapshot as <stem>@<name>.raw, read-only (default: on "
        "read-only mounts, not with --rw or --overlay)"))
    allow_other: bool = field(default=False, metadata=option(
        "--allow-other", action="store_true",
        help="let other users access the mount (FUSE allow_other)"))
    follow_outside: bool = field(default=True, metadata=option(
        "--no-follow-outside", action="store_false",
        help="refuse backing files and extents outside the image's directory"))
    debug: bool = field(default=False, metadata=option(
        "--debug", action="store_true", help="log every FUSE request"))
    #: Limits over each image (its own budget, or a shared ``group=``).
    throttle: str | None = field(default=None, metadata=option(
        "--throttle", metavar="LIMITS",
        help="keep each IMAGE's I/O within QEMU-style limits, e.g. "
        "bps-read=50M,iops-total=2000 (bps-{total,read,write}, iops-{total,read,write}, "
        "their -max and -max-length, iops-size); group=NAME: all the IMAGEs share one budget; "
        "changeable while mounted through stats/<stem>/throttle"))
    #: URLs: TLS (``--ca-file``, ``--no-verify-tls``) and the read cache (``--no-cache``,
    #: ``--cache-dir``).
    remote: RemoteOptions = field(default_factory=RemoteOptions, metadata=NESTED)

    @property
    def show_snapshots(self) -> bool:
        if self.snapshots is not None:
            return self.snapshots
        return not (self.writable or self.overlay is not None)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Every option of the request (not IMAGE and MOUNTPOINT: the caller's positionals)."""
        add_options(parser, MountRequest)

    @classmethod
    def from_args(cls, args: argparse.Namespace, images: list[str],
                  mountpoint: str) -> MountRequest:
        return from_args(cls, args, images=images, mountpoint=mountpoint)

    def to_json(self) -> str:
        """The request for another process (the daemon): file names absolute, URLs (and their
        credentials, which therefore never appear on a command line) as they are."""
        return json.dumps(to_plain(self))

    @classmethod
    def from_json(cls, text: str) -> MountRequest:
        data: dict[str, Any] = json.loads(text)
        return from_plain(cls, data)
