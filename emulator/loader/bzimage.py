"""A bzImage: its setup header and the compressed ``vmlinux`` inside it.

The real-mode setup code and the self-decompressor are not used: the VMM extracts the ELF
``vmlinux`` from the payload (``setup_header.payload_offset``/``payload_length``, boot
protocol 2.08+) and boots it through the 64-bit protocol, as the setup code would hand over.
That also works where the real-mode path cannot run (on the emulated KVM it hangs).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from emulator.loader.bootparam_abi import (
    BOOT_FLAG,
    SETUP_HEADER_MAGIC,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
)
from emulator.loader.decompress import decompress
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["BzImage", "is_bzimage", "parse_bzimage"]

#: Boot protocol 2.08 added payload_offset/payload_length.
MIN_PROTOCOL = 0x0208
#: Largest vmlinux accepted from a payload (a distribution kernel is ~60 MiB unstripped).
MAX_VMLINUX_SIZE = 512 << 20
_HEADER_END = SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)


@dataclass(frozen=True)
class BzImage:
    header: SetupHeader
    #: The setup header as the image has it (bytes 0x1f1 up to its declared end), which the
    #: boot loader copies into boot_params.
    header_bytes: bytes
    payload: bytes
    compression: str | None = None

    def extract_vmlinux(self, *, path: str = "bzImage") -> tuple[str, bytes]:
        """Decompress the payload; ``(compression name, ELF bytes)``."""
        if self.payload.startswith(b"\x7fELF"):
            return "none", self.payload
        return decompress(self.payload, MAX_VMLINUX_SIZE, path=path)


def is_bzimage(image: bytes) -> bool:
    if len(image) < _HEADER_END:
        return False
    header = SetupHeader.from_buffer_copy(image, SETUP_HEADER_OFFSET)
    return bool(header.boot_flag == BOOT_FLAG and header.header == SETUP_HEADER_MAGIC)


def parse_bzimage(image: bytes, *, path: str = "bzImage") -> BzImage:
    if not is_bzimage(image):
        raise FormatError("not a bzImage (no HdrS setup header)", path=path)
    header = SetupHeader.from_buffer_copy(image, SETUP_HEADER_OFFSET)
    if header.version < MIN_PROTOCOL:
        raise UnsupportedError(
            f"boot protocol {header.version >> 8}.{header.version & 0xff:02d} is older than "
            "2.08 (no payload fields)", path=path, field="version")
    if header.version >= 0x020C and not header.xloadflags & XLF_KERNEL_64:
        raise UnsupportedError("the kernel has no 64-bit entry point (XLF_KERNEL_64)",
                               path=path, field="xloadflags")
    setup_sects = header.setup_sects or 4
    protected_mode = (setup_sects + 1) * 512
    start = protected_mode + header.payload_offset
    end = start + header.payload_length
    if header.payload_length == 0 or end > len(image):
        raise FormatError(
            f"payload of {header.payload_length} bytes at {start:#x} lies outside the file "
            f"({len(image)} bytes)", path=path, field="payload_offset")
    # The header's own length: 0x202 + the byte at 0x201 (the jump's displacement).
    declared_end = min(0x202 + image[0x201], _HEADER_END)
    return BzImage(header, bytes(image[SETUP_HEADER_OFFSET:declared_end]),
                   bytes(image[start:end]))
