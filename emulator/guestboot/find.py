"""Finding what a disk image would boot -- kernel, initrd, command line -- by reading its file
systems through the vdiskfs stack (``vdiskfs boot --disk IMAGE`` without ``--kernel``).

Search order, over the partitions of the disk in number order (the whole disk when it has no
partition table), each holding an ext2/3/4 file system:

1. a GRUB configuration: ``/boot/grub/grub.cfg`` (``/boot/grub2/``) on a root file system, or
   ``/grub/grub.cfg`` on a separate boot partition; the first found decides, and its default
   entry (:mod:`.grub`) is booted as it is written;
2. otherwise the newest ``vmlinuz-<version>`` in ``/boot`` (or at the top of a boot partition)
   with its ``initrd.img-<version>`` (or ``initramfs-<version>.img``), and the command line
   ``root=UUID=<uuid> ro`` with an initrd (its user space reads UUIDs) or ``root=/dev/vdaN ro``
   without one (a kernel alone cannot); the root is the file system whose ``/boot`` held the
   kernel, or, for a boot partition, the first other one with an ``/etc``.

``console=ttyS0`` is added when the command line does not send the console there: the VMM's
only console is the serial port. The kernel's ``/boot/config-<version>``, when there is one,
tells whether it can find the VMM's disks at all (ACPI, or the command-line device list).

Threads: the partition table is read on the trio loop; the file systems are read by dissect,
which is synchronous, in one worker thread whose reads go back to the loop
(:mod:`vdiskfs.block.syncfile`). That keeps the whole search -- grub.cfg, kernel, initrd -- one
plain sequential function, and the loop free meanwhile. The files are read into memory before
the VM is built: the loader wants them whole anyway.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import trio

from emulator.guestboot.grub import GrubChoice, Location, choose_entry
from vdiskfs.block.node import BlockNode
from vdiskfs.block.syncfile import open_node_file
from vdiskfs.errors import FormatError, UnsupportedError, VdiskError
from vdiskfs.fsread import PROBE_SIZE, ExtVolume, identify_fs
from vdiskfs.partitions import open_window, scan_disk

__all__ = ["BootChoice", "find_boot"]

log = logging.getLogger(__name__)

#: Where a GRUB configuration is looked for, in order: on a root, then on a boot partition.
GRUB_CONFIGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/grub/grub.cfg",
                "/grub2/grub.cfg")
#: Where kernels are looked for when there is no configuration.
KERNEL_DIRS = ("/boot", "/")
#: Largest kernel read (as ``--kernel``: emulator.loader.MAX_KERNEL_FILE).
MAX_KERNEL = 1 << 30
MAX_KERNEL_CONFIG = 8 << 20
_INITRD_NAMES = ("initrd.img-{}", "initramfs-{}.img", "initrd-{}.img", "initrd-{}")
#: Names beside the kernels that are not kernels to boot: backups and signatures.
_NOT_KERNELS = (".old", ".bak", ".dpkg-bak", ".dpkg-old", ".dpkg-new", ".dpkg-tmp", ".sig")


@dataclass
class BootChoice:
    """What the image boots, read and ready to load."""

    kernel: bytes
    #: ``"disk.qcow2 partition 1: /boot/vmlinuz-6.1.0"``.
    kernel_name: str
    initrd: bytes | None
    initrd_names: tuple[str, ...]
    #: The command line as chosen (``console=ttyS0`` added where needed).
    cmdline: str
    #: How it was chosen: ``grub.cfg default entry 'Debian' (disk partition 1: /boot/...)``.
    reason: str
    warnings: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {"kernel": self.kernel_name, "initrd": list(self.initrd_names),
                "cmdline": self.cmdline, "chosen_by": self.reason, "warnings": self.warnings}


def with_serial_console(cmdline: str) -> str:
    """``cmdline`` with ``console=ttyS0`` last unless it sends the console to ttyS0 already:
    the last ``console=`` becomes /dev/console, and the VMM's console is the serial port."""
    words = cmdline.split()
    if any(w == "console=ttyS0" or w.startswith("console=ttyS0,") for w in words):
        return cmdline
    return " ".join([*words, "console=ttyS0"])


def version_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a kernel version: numbers compare as numbers (``6.1.0-13`` after
    ``6.1.0-9``), as ``dpkg --compare-versions`` and ``sort -V`` mostly do."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|[^\d]+", name))


def kernel_config_warnings(config: str, kernel: str) -> list[str]:
    """What the kernel's config says it cannot do on this VMM: find its disks."""
    enabled = dict(re.findall(r"^(CONFIG_[A-Z0-9_]+)=(\S+)", config, re.M))
    warnings = []
    if enabled.get("CONFIG_ACPI") != "y" and \
            enabled.get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") != "y":
        warnings.append(
            f"{kernel}: built without CONFIG_ACPI and without "
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES: it cannot find the VMM's virtio-mmio disks "
            "(they are described only in ACPI tables and on the command line)")
    if enabled.get("CONFIG_VIRTIO_MMIO") not in ("y", "m") or \
            enabled.get("CONFIG_VIRTIO_BLK") not in ("y", "m"):
        warnings.append(f"{kernel}: built without CONFIG_VIRTIO_MMIO or CONFIG_VIRTIO_BLK: "
                        "it has no driver for the VMM's disks")
    return warnings


class _Disk:
    """The booted disk's file systems, opened as they are first needed (worker thread).
    Implements :class:`emulator.guestboot.grub.Devices`."""

    def __init__(self, name: str, parts: dict[int | None, BlockNode]) -> None:
        self.name = name
        self.parts = parts
        self._volumes: dict[int | None, ExtVolume | None] = {}
        #: What each partition that is not a readable ext file system holds, for the error
        #: when nothing is found.
        self.skipped: dict[int | None, str] = {}

    def describe(self, part: int | None) -> str:
        return self.name if part is None else f"{self.name} partition {part}"

    def volume(self, part: int | None) -> ExtVolume | None:
        if part in self._volumes:
            return self._volumes[part]
        volume = None
        node = self.parts.get(part)
        if node is None:
            self.skipped[part] = "no such partition"
        else:
            fh = open_node_file(node)
            kind = identify_fs(fh.read(PROBE_SIZE))
            if kind == "ext2/3/4":
                try:
                    volume = ExtVolume(fh, self.describe(part))
                except FormatError as exc:
                    self.skipped[part] = exc.message
            else:
                self.skipped[part] = (f"{kind}: not read (only ext2/3/4 is)" if kind
                                      else "no file system recognised")
        self._volumes[part] = volume
        return volume

    def read(self, part: int | None, path: str, limit: int) -> bytes:
        volume = self.volume(part)
        if volume is None:
            raise FormatError(f"cannot read {path}: {self.skipped[part]}",
                              path=self.describe(part))
        return volume.read(path, limit)

    def is_file(self, part: int | None, path: str) -> bool:
        volume = self.volume(part)
        return volume is not None and volume.is_file(path)

    def find(self, kind: str, key: str) -> int | bool | None:
        for part in self.parts:
            volume = self.volume(part)
            if volume is None:
                continue
            if (kind == "fs-uuid" and volume.uuid.lower() == key.lower()) or \
                    (kind == "label" and volume.label == key) or \
                    (kind == "file" and volume.is_file(key)):
                return part
        return False

    def root_device(self, part: int | None) -> str:
        """The kernel's name for the partition: the booted disk is the first, /dev/vda."""
        return "/dev/vda" if part is None else f"/dev/vda{part}"


def _from_grub(disk: _Disk, config: Location) -> tuple[GrubChoice, str]:
    choice = choose_entry(disk, config)
    where = f"{disk.describe(choice.config.part)}: {choice.config.path}"
    return choice, f"grub.cfg default entry {choice.title!r} ({where})"


def _newest_kernel(disk: _Disk) -> GrubChoice | None:
    """The newest vmlinuz-* and its initrd, with a root= of our own; None if none."""
    found: list[tuple[tuple[tuple[int, int | str], ...], int | None, str, str]] = []
    for part in disk.parts:
        volume = disk.volume(part)
        if volume is None:
            continue
        for directory in KERNEL_DIRS:
            for name in volume.listdir(directory):
                if name.startswith("vmlinuz-") and not name.endswith(_NOT_KERNELS) and \
                        volume.is_file(posixpath.join(directory, name)):
                    version = name[len("vmlinuz-"):]
                    found.append((version_key(version), part, directory, version))
    if not found:
        return None
    _, part, directory, version = max(found, key=lambda f: f[0])
    volume = disk.volume(part)
    assert volume is not None
    kernel = Location(part, posixpath.join(directory, f"vmlinuz-{version}"))
    initrds = tuple(Location(part, posixpath.join(directory, n.format(version)))
                    for n in _INITRD_NAMES if volume.is_file(posixpath.join(directory,
                                                                            n.format(version))))
    root_part = part
    if directory != "/boot":
        # A separate boot partition: the root is another file system, one with an /etc.
        root_part = next((p for p in disk.parts if p != part
                          and (other := disk.volume(p)) is not None and other.listdir("/etc")),
                         None)
        if root_part is None:
            raise FormatError(f"{kernel.path} is on a boot partition, and no other partition "
                              "holds a root file system (an /etc)", path=disk.describe(part))
    root_volume = disk.volume(root_part)
    assert root_volume is not None
    # An initramfs finds the root by UUID (udev, blkid); a kernel alone knows only device
    # names (and PARTUUID, which an MBR disk has no stable form of).
    root = f"UUID={root_volume.uuid}" if initrds else disk.root_device(root_part)
    return GrubChoice("", kernel, initrds[:1], f"root={root} ro", kernel)


def _nothing_found(disk: _Disk) -> VdiskError:
    seen = "; ".join(f"{disk.describe(p)}: {why}" for p, why in disk.skipped.items())
    read = [disk.describe(p) for p in disk.parts if disk.volume(p) is not None]
    where = ""
    if read:
        where = (f" in {', '.join(read)} (no {' or '.join(GRUB_CONFIGS[:3])}, "
                 "no /boot/vmlinuz-*)")
    message = f"no kernel to boot found{where}"
    if seen:
        message += f"; {seen}"
    if not read and any("not read" in why for why in disk.skipped.values()):
        return UnsupportedError(message + "; boot it with --kernel", path=disk.name)
    return FormatError(message + "; boot it with --kernel", path=disk.name)


def _find_sync(disk: _Disk, initrd_limit: int) -> BootChoice:
    choice = reason = None
    for part in disk.parts:
        config = next((c for c in GRUB_CONFIGS if disk.is_file(part, c)), None)
        if config is not None:
            choice, reason = _from_grub(disk, Location(part, config))
            break
    if choice is None:
        choice = _newest_kernel(disk)
        if choice is None:
            raise _nothing_found(disk)
        reason = "the newest kernel (no grub.cfg)"
    assert reason is not None

    def name(loc: Location) -> str:
        return f"{disk.describe(loc.part)}: {loc.path}"

    kernel = disk.read(choice.kernel.part, choice.kernel.path, MAX_KERNEL)
    initrd = None
    if choice.initrds:
        # Several initrds (microcode first, as GRUB passes them) are one concatenated cpio.
        parts = [disk.read(i.part, i.path, initrd_limit) for i in choice.initrds]
        initrd = b"".join(parts)
        if len(initrd) > initrd_limit:
            raise FormatError(f"initrds of {len(initrd)} bytes do not fit in guest memory",
                              path=name(choice.initrds[0]))
    warnings = []
    base = posixpath.basename(choice.kernel.path)
    if base.startswith("vmlinuz-"):
        config_path = posixpath.join(posixpath.dirname(choice.kernel.path),
                                     "config-" + base[len("vmlinuz-"):])
        if disk.is_file(choice.kernel.part, config_path):
            kernel_config = disk.read(choice.kernel.part, config_path, MAX_KERNEL_CONFIG)
            warnings = kernel_config_warnings(kernel_config.decode("utf-8", "replace"),
                                              name(choice.kernel))
    return BootChoice(kernel, name(choice.kernel), initrd,
                      tuple(name(i) for i in choice.initrds),
                      with_serial_console(choice.cmdline), reason, warnings)


async def find_boot(disk: BlockNode, name: str, *, initrd_limit: int) -> BootChoice:
    """Read what ``disk`` (opened; ``name`` in messages) boots; ``initrd_limit``: the most
    initrd bytes the guest can take. Raises a VdiskError saying why when nothing is found."""
    table = await scan_disk(disk, warn=log.warning)
    async with contextlib.AsyncExitStack() as stack:
        parts: dict[int | None, BlockNode] = {}
        if table.scheme is None:
            parts[None] = disk
        for partition in table.partitions:
            if not partition.extended:
                window = await open_window(disk, partition)
                stack.push_async_callback(window.aclose)
                parts[partition.number] = window
        # abandon_on_cancel=False (the default): the thread's reads run on this loop, which
        # must outlive them.
        return await trio.to_thread.run_sync(_find_sync, _Disk(name, parts), initrd_limit)
