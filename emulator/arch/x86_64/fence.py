"""A full memory fence callable from Python: ``mfence`` through a four-byte function.

Why: the virtqueue's notification suppression stores one index and then loads the other
side's (``needs_notification``: store used idx, load ``used_event``; ``enable_notification``:
store ``avail_event``, load avail idx). x86 may let a load pass an earlier store to another
address (the store sits in the store buffer), so without a fence the device can read a stale
``used_event`` while the guest reads a stale used idx -- each decides the other will act, no
interrupt is raised and the guest waits for ever. rust-vmm's ``virtio-queue`` puts
``fence(SeqCst)`` (``mfence`` on x86) exactly there. Nothing in CPython emits one on request,
so :func:`full_fence` calls one:

- **x86_64**: an anonymous page holding ``0F AE F0 C3`` (``mfence; ret``), made executable
  with ``mprotect`` after it is written (never writable and executable at once), called
  through ctypes without releasing the GIL (``PYFUNCTYPE``: no lock traffic around it).
- **aarch64**: the same with ``dmb ish; ret``, the barrier rust emits for ``fence(SeqCst)``.
- **Where no executable page can be had** (a W^X policy, SELinux ``execmem``...) or on another
  architecture: an uncontended :class:`threading.Lock` acquire and release. On x86 that is a
  ``lock``-prefixed read-modify-write (glibc's semaphore under CPython 3.11's lock, and
  CPython's own mutex from 3.13, take it with a compare-and-swap), and "reads or writes cannot
  be reordered with ... locked instructions" (Intel SDM vol. 3A, "Memory Ordering in P6 and
  More Recent Processor Families"), so the fallback is still a full fence there. On other
  architectures a lock pair is only acquire/release; :data:`FENCE_KIND` then says so (the VMM
  runs only on x86_64 hosts, so that case is for unit tests elsewhere).

Users call it through a module attribute (``fence.full_fence()``), so that the queue's tests
can replace it and check where it is called.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import platform
import threading
from collections.abc import Callable

__all__ = ["FENCE_KIND", "full_fence"]

log = logging.getLogger(__name__)

#: ``mfence; ret``.
_X86_64_CODE = bytes.fromhex("0faef0c3")
#: ``dmb ish; ret`` (little-endian A64 words 0xd5033bbf, 0xd65f03c0).
_AARCH64_CODE = bytes.fromhex("bf3b03d5c0035fd6")
_CODE = {"x86_64": _X86_64_CODE, "amd64": _X86_64_CODE, "aarch64": _AARCH64_CODE,
         "arm64": _AARCH64_CODE}

_PROT_READ, _PROT_EXEC = 1, 4


def _machine_code_fence(code: bytes) -> tuple[Callable[[], None], mmap.mmap]:
    """A callable running ``code``; raises OSError where no executable page can be made."""
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(ctypes.c_void_p(address), mmap.PAGESIZE, _PROT_READ | _PROT_EXEC) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "mprotect(PROT_EXEC) refused")
    # The page object stays referenced (returned with the function) for the process's life:
    # the mapping must outlive every call, and the buffer export keeps it from being closed.
    return ctypes.PYFUNCTYPE(None)(address), page


def _lock_fence() -> Callable[[], None]:
    lock = threading.Lock()

    def fence() -> None:
        # Uncontended: a locked compare-and-swap on acquire (a full barrier on x86).
        lock.acquire()
        lock.release()

    return fence


def _choose() -> tuple[Callable[[], None], str, object]:
    machine = platform.machine().lower()
    code = _CODE.get(machine)
    if code is not None:
        try:
            fence, keep = _machine_code_fence(code)
            fence()  # fail here, not in the middle of a queue operation
            instruction = "mfence" if code is _X86_64_CODE else "dmb ish"
            return fence, instruction, keep
        except (OSError, AttributeError, ValueError) as exc:
            log.info("no executable page for a fence (%s): using a locked operation", exc)
    if code is _X86_64_CODE:
        return _lock_fence(), "locked rmw (full barrier on x86)", None
    return _lock_fence(), f"lock acquire/release (not a full barrier on {machine or '?'})", None


full_fence: Callable[[], None]
#: Which fence :func:`full_fence` is: "mfence", "dmb ish", or the lock fallback and why.
FENCE_KIND: str
full_fence, FENCE_KIND, _keep_alive = _choose()
