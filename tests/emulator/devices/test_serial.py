"""The 16550A UART as Linux's 8250 driver drives it: probe, transmit, receive, interrupts."""

from __future__ import annotations

from emulator.devices.irq import RecordingLine
from emulator.devices.serial import Serial


class Uart:
    def __init__(self) -> None:
        self.line = RecordingLine()
        self.out = bytearray()
        self.serial = Serial(self.line, self.out.extend)

    def r(self, offset: int) -> int:
        return self.serial.read(offset, 1)[0]

    def w(self, offset: int, value: int) -> None:
        self.serial.write(offset, bytes([value]))


def test_probe_scratch_and_loopback() -> None:
    uart = Uart()
    uart.w(7, 0xA5)
    assert uart.r(7) == 0xA5
    # autoconfig: loopback with RTS|OUT2 must read back CTS|DCD in MSR.
    uart.w(4, 0x10 | 0x0A)
    assert uart.r(6) & 0xF0 == 0x90
    uart.w(0, ord("x"))  # looped back, not output
    assert uart.out == b""
    assert uart.r(5) & 0x01
    assert uart.r(0) == ord("x")
    uart.w(4, 0x08)
    assert uart.r(6) == 0xB0


def test_fifo_bits_and_divisor_latch() -> None:
    uart = Uart()
    uart.w(2, 0x01)
    assert uart.r(2) & 0xC0 == 0xC0  # 16550A with FIFO
    uart.w(3, 0x80)  # DLAB
    uart.w(0, 0x01)
    uart.w(1, 0x00)
    assert (uart.r(0), uart.r(1)) == (0x01, 0x00)
    uart.w(3, 0x03)


def test_transmit_and_thr_empty_interrupt() -> None:
    uart = Uart()
    assert uart.r(5) & 0x60 == 0x60  # THRE | TEMT
    uart.w(0, ord("h"))
    uart.w(0, ord("i"))
    assert uart.out == b"hi"
    uart.w(1, 0x02)  # enable THRI: interrupt at once
    assert uart.line.level and uart.r(2) & 0x0F == 0x02
    assert not uart.line.level  # reading IIR acknowledged it
    assert uart.r(2) & 0x01  # no interrupt pending
    uart.w(0, ord("!"))
    assert uart.line.level  # THR empty again after the byte went out


def test_receive_interrupt_and_fifo() -> None:
    uart = Uart()
    uart.w(1, 0x01)  # RDI
    assert not uart.line.level
    assert uart.serial.enqueue_input(b"ls\r") == 3
    assert uart.line.level and uart.r(2) & 0x0F == 0x04
    assert bytes(uart.r(0) for _ in range(3)) == b"ls\r"
    assert not uart.line.level and not uart.r(5) & 0x01
    assert uart.serial.stats() == {"tx_bytes": 0, "rx_bytes": 3}


def test_input_is_bounded() -> None:
    uart = Uart()
    room = uart.serial.input_room()
    assert uart.serial.enqueue_input(bytes(room + 10)) == room
    assert uart.serial.input_room() == 0
