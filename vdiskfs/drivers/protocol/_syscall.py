"""``syscall(2)`` through ctypes, for the Linux system calls that Python's ``os`` lacks
(io_uring, cachestat)."""

from __future__ import annotations

import ctypes

__all__ = ["syscall_function"]

_libc = ctypes.CDLL(None, use_errno=True)


def syscall_function(*argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    # Each ``_libc["syscall"]`` is a new function object, so each system call gets its own
    # argument types (syscall(2) is variadic: every argument must be passed at full width).
    # ctypes releases the GIL around the call.
    function = _libc["syscall"]
    function.argtypes = (ctypes.c_long, *argtypes)
    function.restype = ctypes.c_long
    return function
