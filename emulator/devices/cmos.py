"""The CMOS real-time clock: where a PC kernel reads the wall-clock time at boot."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Cmos"]


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Cmos:
    """MC146818 RTC and CMOS RAM behind index port 0x70 and data port 0x71.

    The clock reads the host's UTC time in BCD, 24-hour mode, never "update in progress" (a
    guest polls for that bit to clear); the rest of the 128 bytes is plain RAM.
    """

    REG_A = 0x0A
    REG_B = 0x0B
    REG_C = 0x0C
    REG_D = 0x0D
    CENTURY = 0x32
    #: Register A: 32.768 kHz time base, 1024 Hz rate, UIP clear.
    REG_A_VALUE = 0x26
    #: Register B: 24-hour mode, BCD.
    REG_B_VALUE = 0x02
    #: Register D: valid RAM and time.
    REG_D_VALUE = 0x80

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.index = 0
        self.ram = bytearray(128)
        self.ram[self.REG_A] = self.REG_A_VALUE
        self.ram[self.REG_B] = self.REG_B_VALUE
        self.ram[self.REG_D] = self.REG_D_VALUE

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            return bytes([self.index]) + bytes(size - 1)
        return bytes([self._register(self.index)]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.index = data[0] & 0x7F  # bit 7 masks NMIs
        elif self.index not in (self.REG_C, self.REG_D):
            self.ram[self.index] = data[0]

    def _register(self, index: int) -> int:
        if index in (0, 2, 4, 6, 7, 8, 9, self.CENTURY):
            now = time.gmtime(self.clock())
            value = {
                0: now.tm_sec,
                2: now.tm_min,
                4: now.tm_hour,
                6: (now.tm_wday + 1) % 7 + 1,  # 1 = Sunday
                7: now.tm_mday,
                8: now.tm_mon,
                9: now.tm_year % 100,
                self.CENTURY: now.tm_year // 100,
            }[index]
            return _bcd(value)
        if index == self.REG_A:
            return self.REG_A_VALUE
        return self.ram[index]
