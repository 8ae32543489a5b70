"""How a guest run ends: an :class:`Outcome` (exit status and one-line reason) and the
:class:`StopSignal` through which any thread ends the run (first reason wins)."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Outcome", "OutcomeKind", "StopSignal"]


class OutcomeKind(enum.StrEnum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    PANIC = "panic"
    TRIPLE_FAULT = "triple-fault"
    EMULATION_FAILURE = "emulation-failure"
    VMM_ERROR = "vmm-error"
    INTERRUPTED = "interrupted"


#: Exit status of the ``boot`` command per outcome: 0 for the guest ending itself cleanly.
_STATUS = {
    OutcomeKind.POWEROFF: 0,
    OutcomeKind.REBOOT: 0,
    OutcomeKind.PANIC: 2,
    OutcomeKind.TRIPLE_FAULT: 3,
    OutcomeKind.EMULATION_FAILURE: 4,
    OutcomeKind.VMM_ERROR: 1,
    OutcomeKind.INTERRUPTED: 130,
}


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    reason: str

    @property
    def status(self) -> int:
        return _STATUS[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


class StopSignal:
    """Set once, from any thread; wakes whoever waits (the vCPU through its kick callback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def is_set(self) -> bool:
        return self._outcome is not None

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback`` runs (in the stopping thread) when the run is stopped."""
        self._listeners.append(callback)

    def stop(self, kind: OutcomeKind, reason: str) -> bool:
        """End the run; False when it was already ending for another reason."""
        with self._lock:
            if self._outcome is not None:
                return False
            self._outcome = Outcome(kind, reason)
        for callback in self._listeners:
            callback()
        return True
