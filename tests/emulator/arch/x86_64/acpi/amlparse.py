"""A reader for the AML subset the VMM writes (Scope, Device, Name, integers, strings,
buffers), written from the specification apart from the encoder, so that the tests check the
bytes rather than the encoder against itself. Resource templates are decoded into their
descriptors."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Node:
    kind: str  # "scope" or "device"
    name: str
    names: dict[str, Any] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)


def _pkg_length(data: bytes, pos: int) -> tuple[int, int]:
    """(end of the package, position after the PkgLength)."""
    lead = data[pos]
    extra = lead >> 6
    if extra == 0:
        return pos + (lead & 0x3F), pos + 1
    length = lead & 0x0F
    for i in range(extra):
        length |= data[pos + 1 + i] << (4 + 8 * i)
    return pos + length, pos + 1 + extra


def _name_string(data: bytes, pos: int) -> tuple[str, int]:
    prefix = ""
    if data[pos] == 0x5C:
        prefix, pos = "\\", pos + 1
    if data[pos] == 0x2E:
        count, pos = 2, pos + 1
    elif data[pos] == 0x2F:
        count, pos = data[pos + 1], pos + 2
    elif data[pos] == 0:
        return prefix, pos + 1
    else:
        count = 1
    segs = [data[pos + 4 * i: pos + 4 * i + 4].decode("ascii") for i in range(count)]
    return prefix + ".".join(segs), pos + 4 * count


def _data(data: bytes, pos: int) -> tuple[Any, int]:
    op = data[pos]
    if op in (0x00, 0x01):
        return op, pos + 1
    sizes = {0x0A: "<B", 0x0B: "<H", 0x0C: "<I", 0x0E: "<Q"}
    if op in sizes:
        fmt = sizes[op]
        return struct.unpack_from(fmt, data, pos + 1)[0], pos + 1 + struct.calcsize(fmt)
    if op == 0x0D:
        end = data.index(b"\0", pos + 1)
        return data[pos + 1:end].decode("ascii"), end + 1
    if op == 0x11:
        end, body = _pkg_length(data, pos + 1)
        size, body = _data(data, body)
        raw = data[body:end]
        assert len(raw) == size, "buffer size does not match its contents"
        return raw, end
    raise AssertionError(f"unexpected AML opcode {op:#x} at {pos}")


def _terms(data: bytes, pos: int, end: int) -> tuple[dict[str, Any], list[Node]]:
    names: dict[str, Any] = {}
    children: list[Node] = []
    while pos < end:
        op = data[pos]
        if op == 0x08:
            name, pos = _name_string(data, pos + 1)
            names[name], pos = _data(data, pos)
        elif op == 0x10 or (op == 0x5B and data[pos + 1] == 0x82):
            kind = "scope" if op == 0x10 else "device"
            pkg_end, body = _pkg_length(data, pos + (1 if op == 0x10 else 2))
            name, body = _name_string(data, body)
            node = Node(kind, name)
            node.names, node.children = _terms(data, body, pkg_end)
            children.append(node)
            pos = pkg_end
        else:
            raise AssertionError(f"unexpected AML opcode {op:#x} at {pos}")
    assert pos == end, "a package overran its length"
    return names, children


def parse(aml: bytes) -> list[Node]:
    """The top-level terms of a definition block (without its table header)."""
    return _terms(aml, 0, len(aml))[1]


def resources(template: bytes) -> list[tuple[str, Any]]:
    """A resource template's descriptors: ("io", (min, max, align, len)),
    ("mem32", (writable, base, len)), ("irq", (flags, [gsi...])); checks the end tag."""
    out: list[tuple[str, Any]] = []
    pos = 0
    while True:
        tag = template[pos]
        if tag == 0x79:
            assert pos + 2 == len(template), "bytes after the end tag"
            return out
        if tag & 0x80:
            length = struct.unpack_from("<H", template, pos + 1)[0]
            body = template[pos + 3:pos + 3 + length]
            if tag == 0x86:
                out.append(("mem32", struct.unpack("<BII", body)))
            elif tag == 0x89:
                flags, count = body[0], body[1]
                out.append(("irq", (flags, list(struct.unpack_from(f"<{count}I", body, 2)))))
            else:
                raise AssertionError(f"unexpected large descriptor {tag:#x}")
            pos += 3 + length
        else:
            length = tag & 7
            if tag >> 3 == 0x08:
                out.append(("io", struct.unpack_from("<HHBB", template, pos + 2)))
            else:
                raise AssertionError(f"unexpected small descriptor {tag:#x}")
            pos += 1 + length
