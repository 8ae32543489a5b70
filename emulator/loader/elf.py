"""Loading an x86_64 ELF ``vmlinux``: its PT_LOAD segments at their physical addresses.

The entry point of a vmlinux is the physical address of ``startup_64`` (the linker script sets
``ENTRY(phys_startup_64)``), which is where the 64-bit boot protocol starts the kernel.
Everything read from the file is bounded: header counts, segment offsets and sizes, and every
segment must land inside guest RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from emulator.memory import GuestMemory
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["ElfKernel", "load_elf"]

ELF_MAGIC = b"\x7fELF"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
#: More program headers than any kernel has (a vmlinux has 4 or 5).
MAX_PROGRAM_HEADERS = 64


@dataclass(frozen=True)
class ElfKernel:
    """Where the kernel went: its entry point and the physical range it occupies."""

    entry: int
    start: int
    end: int


def load_elf(memory: GuestMemory, image: bytes, *, path: str = "vmlinux") -> ElfKernel:
    """Copy the loadable segments of ``image`` into guest memory."""
    if len(image) < _EHDR.size or not image.startswith(ELF_MAGIC):
        raise FormatError("not an ELF file", path=path)
    (ident, _type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize,
     phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(image)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise UnsupportedError("only 64-bit little-endian ELF kernels are supported",
                               path=path, field="e_ident")
    if machine != EM_X86_64:
        raise UnsupportedError(f"ELF machine {machine} is not x86_64", path=path,
                               field="e_machine")
    if phentsize != _PHDR.size or not 0 < phnum <= MAX_PROGRAM_HEADERS:
        raise FormatError(f"{phnum} program headers of {phentsize} bytes", path=path,
                          field="e_phnum")
    if phoff + phnum * phentsize > len(image):
        raise FormatError("program headers lie outside the file", path=path, field="e_phoff",
                          offset=phoff)
    start, end = None, 0
    for index in range(phnum):
        (p_type, _pflags, offset, _vaddr, paddr, filesz, memsz, _align) = _PHDR.unpack_from(
            image, phoff + index * phentsize
        )
        if p_type != PT_LOAD:
            continue
        field = f"program header {index}"
        if filesz > memsz or offset + filesz > len(image):
            raise FormatError(f"segment of {filesz} bytes at {offset:#x} lies outside the "
                              "file", path=path, field=field)
        if not memory.contains(paddr, memsz):
            raise FormatError(f"segment at physical {paddr:#x}+{memsz:#x} does not fit in "
                              f"guest RAM ({memory.size >> 20} MiB)", path=path, field=field)
        memory.write(paddr, memoryview(image)[offset : offset + filesz])
        if memsz > filesz:
            memory.fill(paddr + filesz, memsz - filesz)
        start = paddr if start is None else min(start, paddr)
        end = max(end, paddr + memsz)
    if start is None:
        raise FormatError("no loadable segment", path=path)
    if not start <= entry < end:
        raise FormatError(f"entry point {entry:#x} is outside the loaded kernel "
                          f"({start:#x}-{end:#x}); not a vmlinux?", path=path, field="e_entry")
    return ElfKernel(entry=entry, start=start, end=end)
