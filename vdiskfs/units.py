"""Sizes as users write them, with qemu-img's suffixes."""

from __future__ import annotations

import re

from vdiskfs.errors import VdiskError

__all__ = ["parse_size"]

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """``10G`` -> 10737418240: binary suffixes k, M, G, T, P, E (qemu-img's), bytes bare."""
    match = _SIZE.match(text)
    if match is None:
        raise VdiskError(f"invalid {what} {text!r}: use a number with an optional suffix "
                         "k, M, G, T (powers of 1024)")
    number, suffix = match.groups()
    value = float(number) * _SUFFIXES[suffix.lower()]
    if value != int(value):
        raise VdiskError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)
