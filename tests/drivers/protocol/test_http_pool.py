"""The HTTP pool's request writer and response-head reader that bypass h11 on the hot path:
they must write what h11 writes and hand everything unusual back to h11 (the servers of
test_http.py cover the whole exchange)."""

from __future__ import annotations

import h11
import pytest

from vdiskfs.drivers.protocol.http.pool import _format_request, _parse_head

HEADERS = [("Host", "127.0.0.1:8080"), ("User-Agent", "vdiskfs"), ("Range", "bytes=0-4095"),
           ("If-Range", '"5f3a-1c0000"'), ("Authorization", "Basic dXNlcjpwYXNz")]


def test_request_bytes_are_h11s() -> None:
    conn = h11.Connection(h11.CLIENT)
    expected = conn.send(h11.Request(method="GET", target="/d/disk.qcow2?x=1", headers=HEADERS))
    assert _format_request("GET", "/d/disk.qcow2?x=1", HEADERS) == expected


@pytest.mark.parametrize("target, headers", [
    ("/a b", HEADERS),                              # a space in the target
    ("/disk", [("Bad Name", "x")]),                 # not a token
    ("/disk", [("X-Evil", "a\r\nInjected: yes")]),  # a line break in a value
    ("/disk", [("X-Name", "caf\u00e9")]),            # not ASCII
    ("/disk", [("X-Pad", " padded")]),              # leading blank
])
def test_unusual_requests_go_to_h11(target: str, headers: list[tuple[str, str]]) -> None:
    assert _format_request("GET", target, headers) is None


def test_head_of_a_206() -> None:
    head = (b"HTTP/1.1 206 Partial Content\r\nServer: nginx\r\nContent-Length: 4096\r\n"
            b"Content-Range: bytes 0-4095/1048576\r\nETag:  \"5f3a\" \r\nX-Twice: 1\r\n"
            b"x-twice: 2")
    assert _parse_head(head) == (b"1.1", 206, {
        "server": "nginx", "content-length": "4096", "content-range": "bytes 0-4095/1048576",
        "etag": '"5f3a"', "x-twice": "2"})
    assert _parse_head(b"HTTP/1.0 200") == (b"1.0", 200, {})


@pytest.mark.parametrize("head", [
    b"HTTP/2 206 Partial\r\nContent-Length: 1",
    b"HTTP/1.1 20x Odd",
    b"HTTP/1.1 2060 Odd",
    b"HTTP/1.1 206 OK\r\nContent-Length: 1\r\n folded",
    b"HTTP/1.1 206 OK\r\nContent-Length : 1",
    b"HTTP/1.1 206 OK\r\nno colon",
    b"ICY 200 OK",
])
def test_unusual_heads_go_to_h11(head: bytes) -> None:
    assert _parse_head(head) is None
