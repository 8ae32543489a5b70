"""The kernel command line: built from parts, checked, written NUL-terminated."""

from __future__ import annotations

__all__ = ["Cmdline", "CmdlineError"]


class CmdlineError(ValueError):
    """An argument the kernel could not parse, or a line longer than the kernel accepts."""


class Cmdline:
    """Space-separated arguments, no longer than ``capacity`` bytes including the NUL."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must leave room for the NUL")
        self.capacity = capacity
        self._args: list[str] = []

    def append(self, *args: str) -> None:
        """Add arguments (each split on white space); nothing is added if any is refused."""
        words = [word for arg in args for word in arg.split()]
        for word in words:
            if not word.isprintable() or not word.isascii():
                raise CmdlineError(f"kernel argument {word!r} is not printable ASCII")
        length = len(" ".join(self._args + words)) + 1
        if length > self.capacity:
            raise CmdlineError(
                f"kernel command line of {length} bytes exceeds the kernel's limit of "
                f"{self.capacity} (with the NUL)"
            )
        self._args.extend(words)

    def has(self, key: str) -> bool:
        """Whether an argument ``key`` or ``key=...`` is present."""
        return any(a == key or a.startswith(key + "=") for a in self._args)

    def __str__(self) -> str:
        return " ".join(self._args)

    def as_bytes(self) -> bytes:
        """The line as the kernel reads it, with its terminating NUL."""
        return str(self).encode("ascii") + b"\0"
