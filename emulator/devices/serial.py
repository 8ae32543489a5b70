"""An 8250/16550A UART (COM1): the guest's console, with interrupts, input and output.

Register semantics follow the 16550A data sheet as rust-vmm's ``vm-superio`` implements them:
the transmitter is always ready (a byte written to THR is output at once, and the THR-empty
interrupt fires again), received bytes wait in a FIFO, loopback mode mirrors MCR into MSR (Linux
checks that when it probes the port). The interrupt line is level-triggered as on a PC: high
while an enabled interrupt is pending.

Register accesses come from the vCPU thread; received bytes from the trio loop (stdin); a lock
keeps the two apart.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from emulator.devices.irq import InterruptLine

__all__ = ["Serial"]

# Register offsets.
DATA = 0  # RBR (read) / THR (write); DLL when DLAB
IER = 1  # DLM when DLAB
IIR_FCR = 2  # IIR (read) / FCR (write)
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_BITS = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02

LCR_DLAB = 0x80

MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
#: A terminal is connected and ready.
MSR_DEFAULT = MSR_DCD | MSR_DSR | MSR_CTS

#: Bytes of input held for the guest; more waits in the host (:meth:`Serial.input_room`).
RX_FIFO_CAPACITY = 1024


class Serial:
    """One UART; ``output`` receives every byte the guest transmits."""

    def __init__(self, irq: InterruptLine, output: Callable[[bytes], None]) -> None:
        self.irq = irq
        self.output = output
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03  # 8 data bits
        self.mcr = 0x08  # OUT2
        self.msr = MSR_DEFAULT
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self._thr_empty_pending = False
        self._level = False
        #: Bytes transmitted by / delivered to the guest.
        self.tx_bytes = 0
        self.rx_bytes = 0

    # -- guest register access (vCPU thread) -----------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write(offset, data[0])
            self._update_irq()

    def _read(self, offset: int) -> int:
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                return self.dll
            if self._rx:
                self.rx_bytes += 1
                return self._rx.popleft()
            return 0
        if offset == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            iir = self._interrupt_id()
            if iir == IIR_THRI:
                # Reading IIR acknowledges a THR-empty interrupt (16550A).
                self._thr_empty_pending = False
            return iir | (IIR_FIFO_BITS if self.fcr & FCR_ENABLE_FIFO else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                m = self.mcr
                return ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | (
                    (m & 0x08) << 4)
            return self.msr
        if offset == SCR:
            return self.scr
        return 0

    def _write(self, offset: int, value: int) -> None:
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                if len(self._rx) < RX_FIFO_CAPACITY:
                    self._rx.append(value)
            else:
                self.tx_bytes += 1
                self.output(bytes([value]))
            self._thr_empty_pending = True
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            enabling_thri = value & IER_THRI and not self.ier & IER_THRI
            self.ier = value & IER_MASK
            if enabling_thri:
                # THR is always empty: enabling its interrupt raises it at once.
                self._thr_empty_pending = True
        elif offset == IIR_FCR:
            self.fcr = value
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def _interrupt_id(self) -> int:
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI
        if self.ier & IER_THRI and self._thr_empty_pending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INT
        if level != self._level:
            self._level = level
            self.irq.set_level(level)

    # -- input from the host (any thread) --------------------------------------------------------

    def input_room(self) -> int:
        """How many more bytes :meth:`enqueue_input` accepts now."""
        with self._lock:
            return RX_FIFO_CAPACITY - len(self._rx)

    def enqueue_input(self, data: bytes) -> int:
        """Deliver bytes typed on the host; returns how many were taken."""
        with self._lock:
            room = RX_FIFO_CAPACITY - len(self._rx)
            taken = data[:room]
            self._rx.extend(taken)
            self._update_irq()
        return len(taken)

    def stats(self) -> dict[str, int]:
        return {"tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes}
