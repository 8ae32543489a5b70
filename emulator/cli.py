"""``vdiskfs boot``: the command-line face of the emulator.

``vdiskfs/cli.py`` wires the ``boot`` sub-command to :func:`add_boot_arguments` and
:func:`run_boot`; ``python -m emulator`` uses them directly.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from emulator.arch.x86_64 import layout
from emulator.kvm.vm import KvmError
from emulator.loader.cmdline import CmdlineError
from emulator.vmm import DiskConfig, VmConfig, run_vmm
from vdiskfs.block.registry import read_only_protocol, redact_url, url_scheme
from vdiskfs.drivers.filter.throttle_buckets import parse_throttle
from vdiskfs.errors import VdiskError
from vdiskfs.units import parse_size
from vdiskfs.urlargs import RemoteOptions, add_remote_arguments, protocol_kind

__all__ = ["add_boot_arguments", "parse_disk", "parse_memory", "run_boot"]

log = logging.getLogger("vdiskfs.boot")

_DISK_OPTIONS = ("format", "readonly", "overlay", "snapshot")
#: ``throttle.bps-read=50M``...: the throttle options, QEMU's ``-drive throttling.*`` names.
_THROTTLE_PREFIX = "throttle."


def parse_memory(text: str) -> int:
    """``256M``, ``1G``, ``262144K`` or a bare number of MiB (as QEMU's ``-m``), in bytes."""
    try:
        size = parse_size(text + "M" if text.strip().isdigit() else text, what="memory size")
    except VdiskError as exc:
        raise argparse.ArgumentTypeError(f"{exc.message} (e.g. 256M, 1G)") from None
    if size < 32 << 20:
        raise argparse.ArgumentTypeError("the guest needs at least 32M of memory")
    if size > 64 << 30:
        raise argparse.ArgumentTypeError("at most 64G of guest memory")
    return size


def parse_disk(text: str) -> DiskConfig:
    """``IMAGE[,format=F][,readonly=on|off][,overlay=NEW.qcow2][,snapshot=NAME]`` and
    ``[,throttle.KEY=VALUE]...`` (the keys of ``mount --throttle``); ``,,`` is a literal comma.

    A local IMAGE ends at the first comma: every item after it must be an option. A URL may
    contain commas and ``=`` of its own (``https://h/x.qcow2?sig=a,b``,
    ``nbd+unix:///x?socket=/run/a,b``): its options are the trailing items that are an option
    above (a known key and ``=``), and everything before them is the URL. A URL whose query
    ends in such an item writes that comma as ``,,``.

    An http(s) disk is read-only unless ``readonly=`` says otherwise (QEMU's
    ``auto-read-only``): the protocol cannot write, and an explicit ``readonly=off`` is refused.
    A disk at an internal snapshot (``snapshot=``) is read-only too.
    """
    items = [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]
    cut = 1
    if url_scheme(items[0]) is not None:
        cut = len(items)
        while cut > 1 and _is_disk_option(items[cut - 1]):
            cut -= 1
    path, options = ",".join(items[:cut]), items[cut:]
    if not path:
        raise argparse.ArgumentTypeError("--disk needs an image path or URL")
    disk = DiskConfig(path)
    read_only: bool | None = None
    throttle: list[str] = []
    for option in options:
        if not _is_disk_option(option):
            raise argparse.ArgumentTypeError(
                f"--disk option {option!r}: expected one of "
                + ", ".join(f"{k}=..." for k in (*_DISK_OPTIONS, f"{_THROTTLE_PREFIX}KEY")))
        key, _, value = option.partition("=")
        if key.startswith(_THROTTLE_PREFIX):
            throttle.append(option[len(_THROTTLE_PREFIX):])
            continue
        if key == "format":
            disk.format = value
        elif key == "readonly":
            if value not in ("on", "off"):
                raise argparse.ArgumentTypeError(f"readonly={value}: expected on or off")
            read_only = value == "on"
        elif key == "snapshot":
            if not value:
                raise argparse.ArgumentTypeError("snapshot= needs a snapshot ID or name")
            disk.snapshot = value
        else:
            disk.overlay = value
    if disk.snapshot is not None:
        if disk.overlay is not None:
            # A qcow2 overlay records only a file as its backing file, never an internal
            # snapshot of one (QEMU has no way to say it either): reopened later, it would
            # read the image's current state under the guest's writes.
            raise argparse.ArgumentTypeError(
                "snapshot= and overlay= together: an overlay cannot record an internal "
                "snapshot as its backing file; boot the snapshot read-only, or copy it out "
                "first (qemu-img convert -l snapshot.name=NAME)")
        if read_only is False:
            raise argparse.ArgumentTypeError("snapshot= with readonly=off: an internal "
                                             "snapshot boots read-only")
        read_only = True
    if read_only_protocol(path):
        if read_only is False:
            raise argparse.ArgumentTypeError(
                f"{redact_url(path)}: readonly=off: {protocol_kind(path)} images are read-only")
        # An overlay takes the writes; open_overlay says whether it can sit over this URL.
        read_only = read_only if disk.overlay is not None else True
    disk.read_only = bool(read_only)
    if throttle:
        try:
            disk.throttle = parse_throttle(",".join(throttle), source="--disk",
                                           prefix=_THROTTLE_PREFIX)
        except VdiskError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return disk


def _is_disk_option(item: str) -> bool:
    key, sep, _ = item.partition("=")
    # A throttle key without a value is still one: parse_throttle says what it lacks.
    return key.startswith(_THROTTLE_PREFIX) or (bool(sep) and key in _DISK_OPTIONS)


def add_boot_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vdiskfs boot``."""
    parser.add_argument("--kernel", metavar="VMLINUX_OR_BZIMAGE",
                        help="kernel to boot: an ELF vmlinux or a bzImage (gzip, xz, lzma, "
                        "bzip2, zstd or lz4 payload); without it, the kernel, initrd and "
                        "command line that the first --disk would boot (its grub.cfg's "
                        "default entry, or its newest /boot/vmlinuz-*), read from its "
                        "ext2/3/4 file system")
    parser.add_argument("--initrd", metavar="FILE", help="initial ramdisk (with --kernel)")
    parser.add_argument("--append", default="", metavar="ARGS",
                        help="kernel command line, or what to add to the disk's (console=ttyS0 "
                        "and the virtio_mmio.device= arguments are added)")
    parser.add_argument("--memory", "-m", type=parse_memory, default=256 << 20, metavar="SIZE",
                        help="guest RAM (default 256M)")
    parser.add_argument("--disk", type=parse_disk, action="append", default=[],
                        metavar="IMAGE|URL[,format=F][,readonly=on][,overlay=NEW.qcow2]"
                        "[,snapshot=NAME][,throttle.KEY=VALUE]...",
                        help="a virtio-blk disk served by the vdiskfs stack (/dev/vda, "
                        "/dev/vdb... in order): a file, or an http(s) or s3 (read-only), nbd or "
                        "rbd URL; "
                        "snapshot= boots an internal snapshot (ID or name) read-only; "
                        "throttle.bps-read=50M, throttle.iops-total=2000, throttle.group=G...: "
                        "keep its I/O within limits, as mount --throttle; repeatable")
    add_remote_arguments(parser)
    parser.add_argument("--mount", metavar="MOUNTPOINT",
                        help="while the guest runs, show the disks (read-only) and live "
                        "statistics of every layer, the virtio devices and the VM there")
    parser.add_argument("--stats", metavar="FILE",
                        help="write all statistics as JSON to FILE when the guest ends")
    parser.add_argument("--serial", default="stdio", metavar="stdio|FILE",
                        help="where the serial console goes (stdio: this terminal, with "
                        "input; Ctrl-A x quits)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="log the VMM's decisions to stderr")
    # Developer switches to exercise the fallback paths.
    parser.add_argument("--virtio-notify", choices=("ioeventfd", "exit"), default="ioeventfd",
                        help=argparse.SUPPRESS)
    parser.add_argument("--virtio-irq", choices=("irqfd", "ioctl"), default="irqfd",
                        help=argparse.SUPPRESS)


def run_boot(args: argparse.Namespace) -> int:
    """Boot the guest; the exit status (0 when the guest powered off or rebooted)."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="vdiskfs boot: %(message)s", stream=sys.stderr)
    if args.kernel is None and (args.initrd or not args.disk):
        # Without --kernel the disk's own initrd comes with its kernel. A usage error: 2, as
        # argparse's own (and as when --kernel was required).
        print("vdiskfs boot: error: " + ("--initrd needs --kernel" if args.initrd else
              "--kernel, or a --disk to boot the kernel of"), file=sys.stderr)
        return 2
    config = VmConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        memory=args.memory,
        disks=list(args.disk),
        remote=RemoteOptions.from_args(args),
        serial=args.serial,
        mountpoint=args.mount,
        stats_file=args.stats,
        virtio_notify=args.virtio_notify,
        virtio_irq=args.virtio_irq,
    )
    if len(config.disks) > len(layout.VIRTIO_IRQS):
        # One interrupt line each: the ISA lines no legacy device uses, then the IOAPIC's
        # pins 16-23 (emulator/arch/x86_64/layout.py).
        print(f"vdiskfs boot: error: --disk: {len(config.disks)} disks, at most "
              f"{len(layout.VIRTIO_IRQS)} (one interrupt line each)", file=sys.stderr)
        return 1
    try:
        outcome = trio.run(run_vmm, config)
    except (VdiskError, KvmError, CmdlineError) as exc:
        print(f"vdiskfs boot: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vdiskfs boot: error: {exc}", file=sys.stderr)
        return 1
    if outcome.status != 0 or args.verbose:
        print(f"vdiskfs boot: {outcome}", file=sys.stderr)
    return outcome.status
