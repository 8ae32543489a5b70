"""i8042 reset, the CMOS clock, and bus dispatch."""

from __future__ import annotations

import calendar

import pytest

from emulator.devices.bus import Bus
from emulator.devices.cmos import Cmos
from emulator.devices.i8042 import I8042


def test_i8042_reset_and_idle_status() -> None:
    resets: list[bool] = []
    i8042 = I8042(lambda: resets.append(True))
    assert i8042.read(0, 1) == b"\0"
    i8042.write(0, b"\xaa")
    assert resets == []
    i8042.write(0, b"\xfe")
    assert resets == [True]


def test_cmos_clock_in_bcd() -> None:
    moment = calendar.timegm((2026, 11, 26, 13, 45, 59, 0, 0, 0))
    cmos = Cmos(clock=lambda: moment)

    def reg(index: int) -> int:
        cmos.write(0, bytes([index | 0x80]))  # bit 7 masks NMIs, ignored
        return cmos.read(1, 1)[0]

    assert [reg(i) for i in (0, 2, 4, 7, 8, 9, 0x32)] == [0x59, 0x45, 0x13, 0x26, 0x11, 0x26,
                                                          0x20]
    assert reg(0x0A) & 0x80 == 0  # never "update in progress"
    assert reg(0x0B) == 0x02 and reg(0x0D) == 0x80
    cmos.write(0, b"\x40")
    cmos.write(1, b"\x5a")
    assert reg(0x40) == 0x5A


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_bus_dispatch_and_unclaimed() -> None:
    bus = Bus("pio")
    device = Recorder()
    bus.insert(0x3F8, 8, "serial", device)
    assert bus.read(0x3FA, 1) == b"\x02"
    bus.write(0x3F9, b"\x01")
    assert device.writes == [(1, b"\x01")]
    assert bus.read(0x80, 2) == b"\xff\xff"
    bus.write(0x80, b"\x00")
    assert bus.accesses == {"serial": 2, "unclaimed": 2}
    assert bus.unclaimed == {0x80: 2}
    assert bus.read(0x3FF, 2) == b"\xff\xff"  # straddles the end: nobody answers


def test_bus_refuses_overlaps() -> None:
    bus = Bus("mmio")
    bus.insert(0x1000, 0x1000, "a", Recorder())
    with pytest.raises(ValueError, match="overlaps"):
        bus.insert(0x1800, 0x1000, "b", Recorder())
    with pytest.raises(ValueError, match="overlaps"):
        bus.insert(0x800, 0x1000, "c", Recorder())
    bus.insert(0x2000, 0x1000, "d", Recorder())
