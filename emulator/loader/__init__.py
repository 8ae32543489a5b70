"""Loading what the guest boots: the kernel (ELF vmlinux, or a bzImage whose payload holds
one) and the initrd. Writing boot_params is :mod:`emulator.loader.bootparams`'s job."""

from __future__ import annotations

import os
from dataclasses import dataclass

from emulator.arch.x86_64 import layout
from emulator.loader.bzimage import is_bzimage, parse_bzimage
from emulator.loader.elf import ELF_MAGIC, load_elf
from emulator.memory import GuestMemory
from vdiskfs.errors import FormatError, HostIOError

__all__ = ["LoadedKernel", "load_initrd", "load_initrd_bytes", "load_kernel", "load_kernel_image"]

#: Largest kernel file read (a bzImage is ~10 MiB, an unstripped vmlinux up to ~500 MiB).
MAX_KERNEL_FILE = 1 << 30
#: x86 COMMAND_LINE_SIZE for kernels that do not say (ELF vmlinux, old bzImages).
DEFAULT_CMDLINE_SIZE = 2048


@dataclass(frozen=True)
class LoadedKernel:
    entry: int
    start: int
    end: int
    #: "elf", or "bzImage/<compression>".
    kind: str
    setup_header: bytes | None
    cmdline_capacity: int
    initrd_addr_max: int


def _read_file(path: str, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise FormatError(f"{what} of {size} bytes is larger than {limit}", path=path)
            return f.read()
    except OSError as exc:
        raise HostIOError.wrap(exc, path, f"cannot read {what}") from exc


def load_kernel(memory: GuestMemory, path: str) -> LoadedKernel:
    """Load ``path`` (vmlinux or bzImage) into guest memory at its physical addresses."""
    return load_kernel_image(memory, _read_file(path, MAX_KERNEL_FILE, "kernel"), path)


def load_kernel_image(memory: GuestMemory, image: bytes, path: str) -> LoadedKernel:
    """Load a kernel file's bytes (vmlinux or bzImage; ``path`` names it in errors)."""
    if image.startswith(ELF_MAGIC):
        elf = load_elf(memory, image, path=path)
        return LoadedKernel(elf.entry, elf.start, elf.end, "elf", None, DEFAULT_CMDLINE_SIZE,
                            layout.INITRD_ADDR_MAX_DEFAULT)
    if is_bzimage(image):
        bz = parse_bzimage(image, path=path)
        del image
        compression, vmlinux = bz.extract_vmlinux(path=path)
        elf = load_elf(memory, vmlinux, path=f"{path} (payload)")
        header = bz.header
        capacity = header.cmdline_size + 1 if header.version >= 0x0206 else 256
        return LoadedKernel(
            elf.entry, elf.start, elf.end, f"bzImage/{compression}", bz.header_bytes,
            min(capacity, layout.CMDLINE_MAX_SIZE),
            header.initrd_addr_max or layout.INITRD_ADDR_MAX_DEFAULT,
        )
    raise FormatError("neither an ELF vmlinux nor a bzImage", path=path)


def load_initrd(memory: GuestMemory, path: str, kernel: LoadedKernel) -> tuple[int, int]:
    """Place the initrd as high as the kernel allows, page aligned; ``(address, size)``."""
    return load_initrd_bytes(memory, _read_file(path, initrd_limit(memory, kernel), "initrd"),
                             path, kernel)


def initrd_limit(memory: GuestMemory, kernel: LoadedKernel) -> int:
    """The most initrd bytes the kernel can reach in ``memory``."""
    return min(memory.regions[0].guest_end, kernel.initrd_addr_max + 1)


def load_initrd_bytes(memory: GuestMemory, data: bytes, path: str,
                      kernel: LoadedKernel) -> tuple[int, int]:
    """:func:`load_initrd` of bytes already read (``path`` names them in errors)."""
    top = initrd_limit(memory, kernel)
    address = (top - len(data)) & ~(layout.PAGE_SIZE - 1)
    if address < kernel.end:
        raise FormatError(
            f"initrd of {len(data)} bytes does not fit between the kernel's end "
            f"({kernel.end:#x}) and {top:#x}: give the guest more memory", path=path)
    memory.write(address, data)
    return address, len(data)
