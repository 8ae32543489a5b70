"""``syscall(2)`` through ctypes, for the Linux system calls that Python's ``os`` lacks
(io_uring, cachestat)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["syscall_function"]

_libc = ctypes.CDLL(None, use_errno=True)


def syscall_function(*argtypes: type) -> Callable[..., int]:
    # Each ``_libc["syscall"]`` is a new function object, so each system call gets its own
    # argument types (syscall(2) is variadic: every argument must be passed at full width).
    # ctypes releases the GIL around the call. The restype makes every call return an int.
    function = _libc["syscall"]
    function.argtypes = (ctypes.c_long, *argtypes)
    function.restype = ctypes.c_long
    return function
