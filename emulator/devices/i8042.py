"""The i8042 keyboard controller, as far as a PC kernel reboots through it."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["I8042"]


class I8042:
    """Ports 0x60 (data) and 0x64 (status/command), mapped as one two-byte range each.

    Always idle (status 0: no output byte, input buffer empty), so drivers probing it find no
    keyboard and move on. Command 0xFE (pulse the CPU reset line) is how ``reboot=k`` resets
    the machine: it calls ``on_reset``.
    """

    CMD_RESET_CPU = 0xFE

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        # The status/command port is mapped with offset 0 (see the VMM's bus layout).
        if data[0] == self.CMD_RESET_CPU:
            self.on_reset()
