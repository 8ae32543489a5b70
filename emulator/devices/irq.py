"""Interrupt lines as devices see them.

A device raises its interrupt through an :class:`InterruptLine`; the VMM decides how that
reaches the guest: an irqfd (the kernel injects it, any thread may write), or a
``KVM_IRQ_LINE`` ioctl. Tests use :class:`RecordingLine`.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["InterruptLine", "RecordingLine"]


class InterruptLine(Protocol):
    """One guest interrupt input (a GSI of the in-kernel PIC and IOAPIC)."""

    def pulse(self) -> None:
        """An edge: raise and lower the line (virtio: one interrupt per signal)."""

    def set_level(self, high: bool) -> None:
        """Hold the line at a level (the UART: high while an interrupt is pending)."""


class RecordingLine:
    """An interrupt line that only counts, for unit tests."""

    def __init__(self) -> None:
        self.pulses = 0
        self.level = False
        self.rising_edges = 0

    def pulse(self) -> None:
        self.pulses += 1

    def set_level(self, high: bool) -> None:
        if high and not self.level:
            self.rising_edges += 1
        self.level = high
