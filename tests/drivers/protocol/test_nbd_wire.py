"""NBD messages and URIs on bytes alone: packing, parsing, and refusing what breaks the spec."""

from __future__ import annotations

import errno
import struct

import pytest

from vdiskfs.drivers.protocol.nbd import wire
from vdiskfs.drivers.protocol.nbd.uri import DEFAULT_TIMEOUT, parse_uri
from vdiskfs.drivers.protocol.nbd.wire import NbdProtocolError
from vdiskfs.errors import UnsupportedError, VdiskError


def test_greeting() -> None:
    data = struct.pack(">QQH", wire.NBDMAGIC, wire.IHAVEOPT, 3)
    assert wire.parse_greeting(data) == 3
    assert wire.pack_client_flags(3) == struct.pack(">I", 3)
    assert wire.pack_client_flags(1) == struct.pack(">I", 1)  # no NO_ZEROES unless offered
    with pytest.raises(NbdProtocolError, match="oldstyle"):
        wire.parse_greeting(struct.pack(">QQH", wire.NBDMAGIC, wire.CLISERV_MAGIC, 0))
    with pytest.raises(NbdProtocolError, match="not an NBD server"):
        wire.parse_greeting(b"HTTP/1.1 200 OK\r\n\r")
    with pytest.raises(NbdProtocolError, match="fixed newstyle"):
        wire.parse_greeting(struct.pack(">QQH", wire.NBDMAGIC, wire.IHAVEOPT, 0))


def test_options() -> None:
    assert wire.pack_option(wire.OPT_STRUCTURED_REPLY) == struct.pack(
        ">QII", wire.IHAVEOPT, 8, 0)
    go = wire.pack_go("disk")
    assert go == struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, 4 + 4 + 2 + 2) + (
        struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, wire.INFO_BLOCK_SIZE))
    meta = wire.pack_set_meta_context("", ("base:allocation",))
    assert meta[16:] == struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"
    assert struct.unpack(">I", meta[12:16])[0] == len(meta) - 16
    with pytest.raises(NbdProtocolError, match="longer than 4096"):
        wire.pack_go("x" * 4097)


def test_option_replies() -> None:
    header = struct.pack(">QIII", wire.OPTION_REPLY_MAGIC, wire.OPT_GO, wire.REP_INFO, 12)
    assert wire.parse_option_reply_header(header, wire.OPT_GO) == (wire.REP_INFO, 12)
    with pytest.raises(NbdProtocolError, match="reply to option 7 while waiting for option 8"):
        wire.parse_option_reply_header(header, wire.OPT_STRUCTURED_REPLY)
    with pytest.raises(NbdProtocolError, match="magic"):
        wire.parse_option_reply_header(b"\0" * 20, wire.OPT_GO)
    kind, body = wire.parse_info(struct.pack(">HQH", wire.INFO_EXPORT, 1 << 30, 0x6D))
    assert kind == wire.INFO_EXPORT and wire.parse_info_export(body) == (1 << 30, 0x6D)
    kind, body = wire.parse_info(struct.pack(">HIII", wire.INFO_BLOCK_SIZE, 512, 4096, 1 << 25))
    assert wire.parse_info_block_size(body) == (512, 4096, 1 << 25)
    for bad in ((3, 4096, 1 << 25), (1 << 17, 1 << 17, 1 << 25), (512, 256, 1 << 25)):
        with pytest.raises(NbdProtocolError):
            wire.parse_info_block_size(struct.pack(">III", *bad))
    assert wire.parse_meta_context(struct.pack(">I", 7) + b"base:allocation") == (
        7, "base:allocation")
    assert wire.option_error_text(wire.REP_ERR_UNKNOWN, b"no such export 'x'") == (
        "no such export (no such export 'x')")


def test_request_and_replies() -> None:
    req = wire.pack_request(wire.CMD_WRITE_ZEROES, 9, 4096, 512, wire.CMD_FLAG_NO_HOLE)
    assert req == struct.pack(">IHHQQI", wire.REQUEST_MAGIC, 2, 6, 9, 4096, 512)
    assert len(req) == 28
    offset, data = wire.parse_offset_data(struct.pack(">Q", 100) + b"abc")
    assert offset == 100 and bytes(data) == b"abc"
    with pytest.raises(NbdProtocolError):
        wire.parse_offset_data(struct.pack(">Q", 100))
    assert wire.parse_offset_hole(struct.pack(">QI", 4096, 512)) == (4096, 512)
    with pytest.raises(NbdProtocolError, match="size 0"):
        wire.parse_offset_hole(struct.pack(">QI", 4096, 0))
    status = struct.pack(">IIIII", 1, 65536, wire.STATE_HOLE | wire.STATE_ZERO, 4096, 0)
    assert wire.parse_block_status(status) == (1, [(65536, 3), (4096, 0)])
    for bad in (struct.pack(">I", 1), status[:-1], struct.pack(">III", 1, 0, 0)):
        with pytest.raises(NbdProtocolError):
            wire.parse_block_status(bad)


def test_error_chunks() -> None:
    chunk = struct.pack(">IH", wire.NBD_ENOSPC, 4) + b"full"
    assert wire.parse_error_chunk(wire.REPLY_TYPE_ERROR, chunk) == (wire.NBD_ENOSPC, "full", None)
    chunk = struct.pack(">IH", wire.NBD_EIO, 0) + struct.pack(">Q", 8192)
    assert wire.parse_error_chunk(wire.REPLY_TYPE_ERROR_OFFSET, chunk) == (wire.NBD_EIO, "", 8192)
    with pytest.raises(NbdProtocolError, match="longer than the chunk"):
        wire.parse_error_chunk(wire.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 10) + b"x")
    assert wire.errno_of(wire.NBD_ENOSPC) == errno.ENOSPC
    assert wire.errno_of(wire.NBD_ESHUTDOWN) == errno.ESHUTDOWN
    assert wire.errno_of(4242) == errno.EINVAL  # "as if it had been NBD_EINVAL"


@pytest.mark.parametrize(("url", "export", "host", "port", "socket"), [
    ("nbd://example.com:10810/disk", "disk", "example.com", 10810, None),
    ("nbd://example.com/disk", "disk", "example.com", 10809, None),
    ("nbd://example.com/", "", "example.com", 10809, None),
    ("nbd://example.com", "", "example.com", 10809, None),
    ("nbd://example.com//disk", "/disk", "example.com", 10809, None),
    ("nbd://example.com/hello%20world", "hello world", "example.com", 10809, None),
    ("nbd://[::1]:7000/x", "x", "::1", 7000, None),
    ("NBD://127.0.0.1/a/b.qcow2", "a/b.qcow2", "127.0.0.1", 10809, None),
    ("nbd+unix:///disk?socket=/run/nbd.sock", "disk", None, 10809, "/run/nbd.sock"),
    ("nbd+unix:///?socket=sock", "", None, 10809, "sock"),
])
def test_uri(url: str, export: str, host: str | None, port: int, socket: str | None) -> None:
    address = parse_uri(url)
    assert (address.export, address.host, address.port, address.socket) == (
        export, host, port, socket)
    assert address.timeout == DEFAULT_TIMEOUT


def test_uri_refusals() -> None:
    assert parse_uri("nbd://h/x?x-timeout=2.5").timeout == 2.5
    for url, match in (
        ("nbd+unix:///disk", "needs \\?socket"),
        ("nbd+unix://host/disk?socket=s", "takes no host"),
        ("nbd://h/disk?socket=s", "only for nbd\\+unix"),
        ("nbd://h/disk?color=red", "unknown query parameter 'color'"),
        ("nbd://h:99999/disk", "port"),
        ("nbd://h/x?x-timeout=0", "positive"),
        ("nbd://h/x#frag", "fragment"),
    ):
        with pytest.raises(VdiskError, match=match) as info:
            parse_uri(url)
        assert info.value.errno == errno.EINVAL and url in str(info.value)
    with pytest.raises(VdiskError, match="needs an nbds://"):
        parse_uri("nbd://h/x?tls-type=x509")
    for url in ("nbds://h/x?tls-type=psk", "nbds://user@h/x"):
        with pytest.raises(UnsupportedError, match=r"x509|PSK"):
            parse_uri(url)


def test_tls_uri() -> None:
    address = parse_uri("nbds://h/x")
    assert address.tls and address.tls_verify_peer and address.tls_hostname is None
    address = parse_uri("nbds+unix:///x?socket=s&tls-hostname=srv&tls-verify-peer=0"
                        "&tls-certificates=/etc/pki/nbd&tls-type=x509")
    assert (address.tls, address.socket, address.tls_hostname, address.tls_verify_peer,
            address.tls_certificates) == (True, "s", "srv", False, "/etc/pki/nbd")
    assert not parse_uri("nbd://h/x").tls
