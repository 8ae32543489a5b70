"""The io_uring ABI, transcribed from Linux ``include/uapi/linux/io_uring.h`` (no logic here).

Only what :mod:`vdiskfs.drivers.protocol.engine` uses: the three system calls, the setup
parameters, the ring offsets, one submission and one completion entry, and the opcodes for
read, write and fsync. The io_uring system call numbers are the same on every architecture.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from vdiskfs.drivers.protocol._syscall import syscall_function

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

# io_uring_setup flags
IORING_SETUP_CLAMP = 1 << 4

# io_uring_params.features
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1

# io_uring_enter flags
IORING_ENTER_GETEVENTS = 1 << 0

# io_uring_register opcodes
IORING_REGISTER_EVENTFD = 4
IORING_REGISTER_IOWQ_MAX_WORKERS = 19

# sqe.flags
IOSQE_ASYNC = 1 << 4  # do not try inline: hand the request to an io-wq worker at once

# mmap offsets of the three areas
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# opcodes
IORING_OP_FSYNC = 3
IORING_OP_READ = 22
IORING_OP_WRITE = 23

# fsync_flags
IORING_FSYNC_DATASYNC = 1 << 0


class SqringOffsets(ctypes.Structure):
    _fields_ = (
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    )


class CqringOffsets(ctypes.Structure):
    _fields_ = (
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("overflow", ctypes.c_uint32),
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    )


class Params(ctypes.Structure):
    """struct io_uring_params (120 bytes)."""

    _fields_ = (
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", SqringOffsets),
        ("cq_off", CqringOffsets),
    )


assert ctypes.sizeof(Params) == 120

#: struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len, rw_flags
#: (fsync_flags...), user_data, buf_index, personality, splice_fd_in, addr3, pad.
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
assert SQE.size == 64
#: struct io_uring_cqe (16 bytes): user_data, res, flags.
CQE = struct.Struct("<QiI")
assert CQE.size == 16


class PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (part of the stable ABI since 3.11): pins a buffer's memory."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),  # a reference PyBuffer_Release drops
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


PYBUF_SIMPLE = 0
PYBUF_WRITABLE = 1

_setup = syscall_function(ctypes.c_uint, ctypes.c_void_p)
_enter = syscall_function(ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                          ctypes.c_void_p, ctypes.c_size_t)
_register = syscall_function(ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint)


def io_uring_setup(entries: int, params: Params) -> int:
    return _setup(SYS_IO_URING_SETUP, entries, ctypes.byref(params))


def io_uring_enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    return _enter(SYS_IO_URING_ENTER, fd, to_submit, min_complete, flags, None, 0)


def io_uring_register(fd: int, opcode: int, arg: ctypes._CArgObject | ctypes.Array[Any] | None,
                      nr_args: int) -> int:
    return _register(SYS_IO_URING_REGISTER, fd, opcode, arg, nr_args)


PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
PyObject_GetBuffer.argtypes = (ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int)
PyObject_GetBuffer.restype = ctypes.c_int
PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
PyBuffer_Release.argtypes = (ctypes.POINTER(PyBuffer),)
PyBuffer_Release.restype = None
