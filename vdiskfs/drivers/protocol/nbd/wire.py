"""The NBD protocol on the wire: constants, and packing and parsing of every message the
client sends or receives. Pure functions on bytes, no I/O (tested on bytes alone).

Everything follows the protocol document, ``doc/proto.md`` of github.com/NetworkBlockDevice/nbd
(the section named in each docstring); all numbers are big-endian ("network byte order").
Only the fixed newstyle handshake is spoken: oldstyle servers are refused.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass

from vdiskfs.errors import VdiskError

__all__ = [
    "NbdProtocolError",
    "errno_of",
]

# -- Magic numbers ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle server greeting and every client option
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting (refused)
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_DEFAULT_PORT = 10809

# -- Handshake flags (server, 16 bits) and client flags (32 bits) ----------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- Transmission flags (16 bits, from NBD_INFO_EXPORT or NBD_OPT_EXPORT_NAME) ---------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- Options ---------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# -- Option reply types (errors have bit 31 set) ---------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

REP_ERROR_NAMES = {
    REP_ERR_UNSUP: "unsupported option",
    REP_ERR_POLICY: "forbidden by the server's policy",
    REP_ERR_INVALID: "invalid option",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "the server requires TLS",
    REP_ERR_UNKNOWN: "no such export",
    REP_ERR_SHUTDOWN: "the server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    REP_ERR_TOO_BIG: "request too big",
}

# -- NBD_INFO types (in NBD_REP_INFO replies to NBD_OPT_GO) ----------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- Commands and command flags --------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write zeroes",
    CMD_BLOCK_STATUS: "block status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- Structured replies ----------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_FLAG_ERROR = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_FLAG_ERROR | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_FLAG_ERROR | 2

# -- base:allocation status flags ------------------------------------------------------------
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- Error values ("Error values": they were the server's errnos, and keep Linux's numbers) --
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO = {
    NBD_EPERM: _errno.EPERM,
    NBD_EIO: _errno.EIO,
    NBD_ENOMEM: _errno.ENOMEM,
    NBD_EINVAL: _errno.EINVAL,
    NBD_ENOSPC: _errno.ENOSPC,
    NBD_EOVERFLOW: _errno.EOVERFLOW,
    NBD_ENOTSUP: _errno.ENOTSUP,
    NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}

#: The longest string the spec lets either side send (export names, messages).
MAX_STRING = 4096
#: Default maximum payload ("Size constraints"): what a client may send without block size
#: information, and what any server must accept.
DEFAULT_MAX_PAYLOAD = 1 << 25


class NbdProtocolError(VdiskError):
    """The server broke the protocol (bad magic, a reply to no request, a chunk out of its
    request's range...): the connection is dropped, as the spec's "hard disconnect"."""

    errno = _errno.EIO


def errno_of(nbd_error: int) -> int:
    """The errno of an NBD error value; an unknown value counts as NBD_EINVAL (the spec:
    "The client SHOULD treat an unexpected error value as if it had been NBD_EINVAL")."""
    return _ERRNO.get(nbd_error, _errno.EINVAL)


# -- Handshake -------------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags


def parse_greeting(data: bytes) -> int:
    """The server's first 18 bytes ("Newstyle negotiation") -> its handshake flags."""
    magic, second, flags = GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise NbdProtocolError(f"not an NBD server (greeting magic {magic:#x})")
    if second == CLISERV_MAGIC:
        raise NbdProtocolError("oldstyle NBD server: only the fixed newstyle handshake is "
                               "supported")
    if second != IHAVEOPT:
        raise NbdProtocolError(f"unknown NBD handshake (magic {second:#x})")
    if not flags & FLAG_FIXED_NEWSTYLE:
        raise NbdProtocolError("the server does not speak the fixed newstyle handshake")
    return int(flags)


def pack_client_flags(handshake_flags: int) -> bytes:
    """Our 32-bit answer: fixed newstyle, and no zeroes when the server offers it (only
    flags the server advertised may be set)."""
    flags = FLAG_C_FIXED_NEWSTYLE
    if handshake_flags & FLAG_NO_ZEROES:
        flags |= FLAG_C_NO_ZEROES
    return struct.pack(">I", flags)


OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def _string(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise NbdProtocolError(f"{what} longer than {MAX_STRING} bytes", errno=_errno.EINVAL)
    return raw


def pack_go(export: str, info_requests: tuple[int, ...] = (INFO_BLOCK_SIZE,),
            option: int = OPT_GO) -> bytes:
    """``NBD_OPT_GO`` (or ``NBD_OPT_INFO``): export name, then the information requested."""
    name = _string(export, "export name")
    data = struct.pack(">I", len(name)) + name + struct.pack(f">H{len(info_requests)}H",
                                                              len(info_requests), *info_requests)
    return pack_option(option, data)


def pack_set_meta_context(export: str, queries: tuple[str, ...],
                          option: int = OPT_SET_META_CONTEXT) -> bytes:
    name = _string(export, "export name")
    data = bytearray(struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)))
    for query in queries:
        raw = _string(query, "metadata context")
        data += struct.pack(">I", len(raw)) + raw
    return pack_option(option, bytes(data))


def pack_export_name(export: str) -> bytes:
    """``NBD_OPT_EXPORT_NAME``: the fallback for servers without ``NBD_OPT_GO``."""
    return pack_option(OPT_EXPORT_NAME, _string(export, "export name"))


OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length


def parse_option_reply_header(data: bytes, option: int) -> tuple[int, int]:
    """An option reply's 20-byte header -> ``(reply type, payload length)``."""
    magic, opt, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise NbdProtocolError(f"bad option reply magic {magic:#x}")
    if opt != option:
        raise NbdProtocolError(f"reply to option {opt} while waiting for option {option}")
    if length > 1 << 20:  # no option reply of ours comes near this
        raise NbdProtocolError(f"option reply of {length} bytes")
    return reply, length


def option_error_text(reply: int, payload: bytes) -> str:
    """A human sentence for an error reply: what the type means, then the server's message."""
    what = REP_ERROR_NAMES.get(reply, f"error {reply & ~REP_FLAG_ERROR}")
    message = payload.decode("utf-8", "replace").strip()
    return f"{what} ({message})" if message else what


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server says about the export (``NBD_INFO_EXPORT`` and ``NBD_INFO_BLOCK_SIZE``)."""

    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD


def parse_info(payload: bytes) -> tuple[int, bytes]:
    """An ``NBD_REP_INFO`` payload -> ``(info type, the rest)``."""
    if len(payload) < 2:
        raise NbdProtocolError(f"NBD_REP_INFO of {len(payload)} bytes")
    (kind,) = struct.unpack_from(">H", payload)
    return kind, payload[2:]


def parse_info_export(body: bytes) -> tuple[int, int]:
    """``NBD_INFO_EXPORT`` -> ``(size, transmission flags)``."""
    if len(body) != 10:
        raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(body) + 2} bytes (not 12)")
    size, flags = struct.unpack(">QH", body)
    return size, flags


def parse_export_name_reply(data: bytes) -> tuple[int, int]:
    """The 10 bytes after ``NBD_OPT_EXPORT_NAME`` (before any 124 zeroes) -> size, flags."""
    size, flags = struct.unpack(">QH", data)
    return size, flags


def parse_info_block_size(body: bytes) -> tuple[int, int, int]:
    """``NBD_INFO_BLOCK_SIZE`` -> ``(minimum, preferred, maximum payload)``, checked against
    the spec's rules ("Size constraints") so that a broken server cannot make us send
    requests of length 0 or loop."""
    if len(body) != 12:
        raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(body) + 2} bytes (not 14)")
    minimum, preferred, maximum = struct.unpack(">III", body)

    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not power_of_two(minimum) or minimum > 1 << 16:
        raise NbdProtocolError(f"minimum block size {minimum} is not a power of 2 <= 64 KiB")
    if not power_of_two(preferred) or preferred < max(minimum, 512):
        raise NbdProtocolError(f"preferred block size {preferred} is invalid")
    if maximum < preferred and maximum < minimum:
        raise NbdProtocolError(f"maximum payload {maximum} is below the minimum block size")
    return minimum, preferred, maximum


def parse_meta_context(payload: bytes) -> tuple[int, str]:
    """``NBD_REP_META_CONTEXT`` -> ``(context id, name)``."""
    if len(payload) < 4:
        raise NbdProtocolError(f"NBD_REP_META_CONTEXT of {len(payload)} bytes")
    (context_id,) = struct.unpack_from(">I", payload)
    return context_id, payload[4:].decode("utf-8", "replace")


# -- Transmission ----------------------------------------------------------------------------

REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length


def pack_request(command: int, cookie: int, offset: int = 0, length: int = 0,
                 flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


#: After the 4-byte magic: a simple reply's error and cookie.
SIMPLE_REPLY_REST = struct.Struct(">IQ")
#: After the 4-byte magic: a structured chunk's flags, type, cookie and payload length.
STRUCTURED_REPLY_REST = struct.Struct(">HHQI")
REPLY_MAGIC = struct.Struct(">I")


def parse_offset_data(payload: bytes | memoryview) -> tuple[int, memoryview]:
    """``NBD_REPLY_TYPE_OFFSET_DATA`` -> ``(offset, data)``."""
    if len(payload) < 9:
        raise NbdProtocolError(f"OFFSET_DATA chunk of {len(payload)} bytes")
    (offset,) = struct.unpack_from(">Q", payload)
    return offset, memoryview(payload)[8:]


def parse_offset_hole(payload: bytes) -> tuple[int, int]:
    """``NBD_REPLY_TYPE_OFFSET_HOLE`` -> ``(offset, length)``."""
    if len(payload) != 12:
        raise NbdProtocolError(f"OFFSET_HOLE chunk of {len(payload)} bytes (not 12)")
    offset, size = struct.unpack(">QI", payload)
    if size == 0:
        raise NbdProtocolError("OFFSET_HOLE chunk of size 0")
    return offset, size


def parse_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """``NBD_REPLY_TYPE_BLOCK_STATUS`` -> ``(context id, [(length, flags), ...])``."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise NbdProtocolError(f"BLOCK_STATUS chunk of {len(payload)} bytes")
    (context_id,) = struct.unpack_from(">I", payload)
    extents = list(struct.iter_unpack(">II", payload[4:]))
    if any(length == 0 for length, _ in extents):
        raise NbdProtocolError("BLOCK_STATUS extent of length 0")
    return context_id, extents


def parse_error_chunk(kind: int, payload: bytes) -> tuple[int, str, int | None]:
    """An error chunk (any type with bit 15 set) -> ``(NBD error, message, offset or None)``.

    Every error type starts with the error and the message; ``ERROR_OFFSET`` adds the offset.
    """
    if len(payload) < 6:
        raise NbdProtocolError(f"error chunk of {len(payload)} bytes")
    error, message_length = struct.unpack_from(">IH", payload)
    if 6 + message_length > len(payload):
        raise NbdProtocolError("error chunk message longer than the chunk")
    message = payload[6 : 6 + message_length].decode("utf-8", "replace")
    offset = None
    if kind == REPLY_TYPE_ERROR_OFFSET:
        if len(payload) != 6 + message_length + 8:
            raise NbdProtocolError("ERROR_OFFSET chunk of the wrong length")
        (offset,) = struct.unpack_from(">Q", payload, 6 + message_length)
    if error == 0:
        error = NBD_EINVAL  # "MUST be nonzero": treat as the unexpected value it is
    return error, message, offset
