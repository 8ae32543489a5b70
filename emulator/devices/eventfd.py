"""An eventfd: the doorbell between the vCPU thread, the kernel and the trio loop.

KVM signals one when the guest writes a registered address (``KVM_IOEVENTFD``) and raises a
guest interrupt when one is written (``KVM_IRQFD``); the vCPU thread writes the same eventfd
when a notification reaches user space instead. Writing is thread-safe and never blocks, so it
is the hand-over from the vCPU thread to trio: the vCPU thread never waits for the loop.
"""

from __future__ import annotations

import os

import trio

__all__ = ["EventFd"]


class EventFd:
    """A non-blocking, close-on-exec eventfd counter."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def write(self, value: int = 1) -> None:
        """Add ``value`` to the counter (any thread)."""
        os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """Take the counter (how many writes since the last read); 0 when none."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    async def wait(self) -> int:
        """Wait on the trio loop until the counter is non-zero, then take it."""
        while True:
            count = self.read()
            if count:
                return count
            await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if _in_trio():
                # Wake (with ClosedResourceError) a task still waiting on it.
                trio.lowlevel.notify_closing(fd)
            os.close(fd)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
