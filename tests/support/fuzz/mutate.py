"""Structure-aware mutation: turn a copy of a seed tree into a hostile case directory.

One case applies one to three mutations, each to a file of the tree (mostly the image itself,
sometimes a backing file or an extent), chosen by :func:`make_case` from a ``random.Random``
seeded with the case's name -- the same name always makes the same case from the same seed.
A mutation is one of:

- **field**: a header field (see :mod:`.layouts`) set to a boundary value for its kind: 0, 1,
  the maximum, off by one, a power of two, huge; for offsets the end of the file and one past
  it, another structure's offset, an unaligned one; for sizes the file's length and beyond;
- **table**: entries of a metadata table aimed anywhere: into the header, at the table itself,
  at another table, past the end of the file, unaligned, duplicated, or set to special values
  (zero, compressed, unallocated...);
- **reference**: a backing file, data file, extent or parent name replaced by a hostile one:
  long, ``..``, absolute, with NUL or invalid UTF-8, a protocol prefix, the image itself, a FIFO,
  socket, directory or symlink loop made in the case directory, ``/dev/stdin``;
- **truncate** or **extend** the file, **havoc** (bytes flipped near a structure), **overlap**
  (one structure copied over another).

After the change, checksums are re-sealed most of the time (VHD, VHDX, GPT), so that the damage
reaches past the first check instead of always stopping there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.fuzz.layouts import (
    COUNT,
    ENUM,
    FLAGS,
    OFFSET,
    SIZE,
    Field,
    Layout,
    Table,
    describe,
)
from tests.support.fuzz.seeds import Seed

__all__ = ["CASE_FILE", "CaseSpec", "copy_case", "make_case"]

#: The file in every case directory that says what to open and how.
CASE_FILE = "case.json"
#: Probability of re-sealing checksums after a mutation.
SEAL_PROBABILITY = 0.85


@dataclass
class CaseSpec:
    """What ``case.json`` holds."""

    kind: str
    format: str
    name: str
    seed: str
    image: str = ""
    mutations: list[str] = field(default_factory=list)
    #: Open with ``follow_outside`` (QEMU's default) rather than ``--no-follow-outside``:
    #: reading a file outside the case directory is then the policy, and only writing there
    #: is a finding.
    follow_outside: bool = False
    #: Parameters of a virtqueue case (see :mod:`.virtio`).
    params: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        (directory / CASE_FILE).write_text(json.dumps(self.__dict__, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> CaseSpec:
        return cls(**json.loads((directory / CASE_FILE).read_text()))


def copy_case(source: Path, target: Path) -> None:
    """Copy a case tree, recreating FIFOs, sockets and symlinks instead of opening them
    (``shutil.copytree`` would block on a FIFO)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(source):
        src, dst = Path(entry.path), target / entry.name
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISDIR(mode):
            copy_case(src, dst)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst)
        elif stat.S_ISSOCK(mode):
            _make_socket(dst)
        elif stat.S_ISREG(mode):
            shutil.copyfile(src, dst)


def _make_socket(path: Path) -> None:
    # A bound, then closed, Unix socket leaves its file behind: nothing listens on it.
    # (A path too long for ``sun_path`` is left out.)
    with socket.socket(socket.AF_UNIX) as sock, contextlib.suppress(OSError):
        sock.bind(str(path))


def make_case(seed: Seed, directory: Path, name: str) -> CaseSpec:
    """Build case ``name`` (deterministic in ``name``) from ``seed`` in ``directory``."""
    rng = random.Random(name)
    copy_case(seed.directory, directory)
    (directory / ".seed-image").unlink(missing_ok=True)
    spec = CaseSpec("image", seed.format, name, seed.name, seed.image)
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and not p.is_symlink())
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        target = seed.image if rng.random() < 0.75 or len(files) == 1 else rng.choice(files)
        path = directory / target
        if not path.is_file():
            continue
        data = bytearray(path.read_bytes())
        layout = describe(data)
        try:
            data, what = _mutate(data, layout, rng, directory, spec)
        except (struct.error, ValueError, IndexError, OverflowError) as exc:
            # A layout read from an already mutated file can point anywhere.
            what = f"mutation skipped ({type(exc).__name__}: {exc})"
        if layout.seal is not None and rng.random() < SEAL_PROBABILITY:
            with contextlib.suppress(struct.error, ValueError, IndexError, OverflowError):
                layout.seal(data)
            what += " (resealed)"
        path.write_bytes(bytes(data))
        spec.mutations.append(f"{target}: {what}")
    spec.save(directory)
    return spec


# -- choosing a mutation ---------------------------------------------------------------------------

Mutator = Callable[[bytearray, Layout, random.Random, Path, CaseSpec], tuple[bytearray, str]]


def _mutate(data: bytearray, layout: Layout, rng: random.Random, directory: Path,
            spec: CaseSpec) -> tuple[bytearray, str]:
    choices: list[tuple[float, Mutator]] = [(3, _truncate), (3, _havoc), (1, _overlap)]
    if layout.fields:
        choices.append((10, _field))
    if layout.tables:
        choices.append((7, _table))
    if layout.references:
        choices.append((5, _reference))
    weights, mutators = zip(*choices, strict=True)
    mutator = rng.choices(mutators, weights)[0]
    return mutator(data, layout, rng, directory, spec)


# -- header fields ---------------------------------------------------------------------------------


def boundary_values(f: Field, old: int, file_len: int, layout: Layout,
                    rng: random.Random) -> list[int]:
    """Candidate values for field ``f`` (currently ``old``) in a file of ``file_len`` bytes."""
    bits = 8 * struct.calcsize(f.fmt)
    top = (1 << bits) - 1
    values = [0, 1, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1, old + 1, old - 1,
              old * 2, old // 2, old ^ (1 << rng.randrange(bits)), rng.getrandbits(bits)]
    unit = f.unit
    if f.kind == OFFSET:
        values += [file_len // unit, file_len // unit + 1, (file_len - 1) // unit, 8 // unit,
                   (file_len + layout.unit * rng.randint(1, 64)) // unit, 1 << (bits - 2)]
        values += [s // unit for s in layout.structures]
    elif f.kind == SIZE:
        values += [file_len // unit, file_len // unit + 1, 511, 513, 4095, 1 << 31, 1 << 32,
                   1 << 40, 1 << 62, 3]
    elif f.kind == COUNT:
        values += [0xFFFF, 0x10000, 1 << 20, 1 << 24, 1 << 31, 2, 3, 7]
    elif f.kind == FLAGS:
        values += [old | (1 << rng.randrange(bits)), old | 1, old & ~1]
    elif f.kind == ENUM:
        values += [rng.randrange(17), old + 2, 0x7F]
    else:
        values += [rng.randrange(70), 8, 9, 16, 22, 31, 32, 63, 64]
    return [v & top for v in values if v >= 0]


def _field(data: bytearray, layout: Layout, rng: random.Random, directory: Path,
           spec: CaseSpec) -> tuple[bytearray, str]:
    f = rng.choices(layout.fields, [f.weight for f in layout.fields])[0]
    size = struct.calcsize(f.fmt)
    if f.offset < 0 or f.offset + size > len(data):
        return data, f"field {f.name}: outside the file, left alone"
    (old,) = struct.unpack_from(f.fmt, data, f.offset)
    value = rng.choice(boundary_values(f, int(old), len(data), layout, rng))
    struct.pack_into(f.fmt, data, f.offset, value)
    return data, f"field {f.name} {old:#x} -> {value:#x}"


# -- metadata tables -------------------------------------------------------------------------------


def _table(data: bytearray, layout: Layout, rng: random.Random, directory: Path,
           spec: CaseSpec) -> tuple[bytearray, str]:
    table = rng.choice(layout.tables)
    size = struct.calcsize(table.fmt)
    count = min(table.count, max(0, (len(data) - table.offset) // size))
    if count <= 0 or table.offset < 0:
        return data, f"table {table.name}: outside the file, left alone"
    used = [i for i in range(min(count, 4096))
            if struct.unpack_from(table.fmt, data, table.offset + size * i)[0]]
    changes = []
    for _ in range(rng.choice((1, 1, 2, 4))):
        index = rng.choice(used) if used and rng.random() < 0.7 else rng.randrange(count)
        at = table.offset + size * index
        (old,) = struct.unpack_from(table.fmt, data, at)
        value = _entry_value(table, int(old), data, layout, rng, used)
        struct.pack_into(table.fmt, data, at, value & ((1 << (8 * size)) - 1))
        changes.append(f"[{index}] {old:#x} -> {value & ((1 << (8 * size)) - 1):#x}")
    return data, f"table {table.name}@{table.offset:#x} " + ", ".join(changes)


def _entry_value(table: Table, old: int, data: bytearray, layout: Layout, rng: random.Random,
                 used: list[int]) -> int:
    roll = rng.random()
    size = struct.calcsize(table.fmt)
    if roll < 0.2 and table.specials:
        return rng.choice(table.specials)
    if roll < 0.3:
        return rng.choice((old + 1, old - 1 if old else 1, old | 1, (1 << (8 * size)) - 1,
                           rng.getrandbits(8 * size)))
    if roll < 0.4 and used:
        # Two entries naming the same place.
        (other,) = struct.unpack_from(table.fmt, data, table.offset + size * rng.choice(used))
        return int(other)
    targets = [0, 8, 512, table.offset, len(data), len(data) + layout.unit,
               (len(data) // layout.unit + 1) * layout.unit, len(data) * 4, 1 << 40, 1 << 55,
               len(data) - 1, rng.randrange(max(1, len(data)))]
    targets += layout.structures
    return table.encode(rng.choice(targets))


# -- names of other files --------------------------------------------------------------------------


def _hostile_names(spec: CaseSpec) -> list[tuple[str, bytes]]:
    own = spec.image.encode()
    return [
        ("empty", b""), ("dot", b"."), ("dotdot", b".."), ("up", b"../../../etc/passwd"),
        ("root", b"/"), ("absolute", b"/etc/passwd"), ("long-255", b"a" * 255),
        ("long-256", b"b" * 256), ("path-max", b"c/" * 2100), ("nul", b"base\0.qcow2"),
        ("newline", b"x\ny"), ("bad-utf8", b"\xff\xfe\xc3("), ("json", b"json:{}"),
        ("nbd", b"nbd://localhost"), ("file-prefix", b"file:" + own), ("self", own),
        ("percent", b"%s%n%x"), ("fifo", b"fifo"), ("socket", b"sock"), ("dir", b"subdir"),
        ("symlink-loop", b"loop"), ("symlink-out", b"out"), ("dangling", b"dangling"),
        ("stdin-link", b"stdin"), ("dev-stdin", b"/dev/stdin"), ("dev-zero", b"/dev/zero"),
        ("dev-null", b"/dev/null"), ("proc-self", b"/proc/self/mem"),
    ]


def _make_special(kind: str, directory: Path) -> None:
    """The file a hostile name refers to, made in the case directory."""
    target = {"fifo": "fifo", "socket": "sock", "dir": "subdir", "symlink-loop": "loop",
              "symlink-out": "out", "dangling": "dangling", "stdin-link": "stdin"}.get(kind)
    if target is None or os.path.lexists(directory / target):
        return
    path = directory / target
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        _make_socket(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink-loop":
        os.symlink("loop", path)
    elif kind == "symlink-out":
        os.symlink("/etc/passwd", path)
    elif kind == "dangling":
        os.symlink("nowhere/at/all", path)
    elif kind == "stdin-link":
        os.symlink("/dev/stdin", path)


def _reference(data: bytearray, layout: Layout, rng: random.Random, directory: Path,
               spec: CaseSpec) -> tuple[bytearray, str]:
    reference = rng.choice(layout.references)
    kind, name = rng.choice(_hostile_names(spec))
    if reference.name == "backing format":
        kind, name = rng.choice([("format", n) for n in (b"", b"r", b"raw\0", b"qcow2",
                                                         b"vmdk", b"file", b"x" * 40,
                                                         b"\xff\xfe", b"qcow2\0junk")])
    _make_special(kind, directory)
    if name.startswith(b"/dev/") and rng.random() < 0.5:
        # QEMU's default policy: the special file itself is then opened, on purpose.
        spec.follow_outside = True
    data = reference.rewrite(data, name)
    shown = name if len(name) <= 40 else name[:20] + b"..." + str(len(name)).encode()
    return data, f"reference {reference.name} -> {kind} {shown!r}"


# -- raw damage ------------------------------------------------------------------------------------


def _truncate(data: bytearray, layout: Layout, rng: random.Random, directory: Path,
              spec: CaseSpec) -> tuple[bytearray, str]:
    n = len(data)
    if rng.random() < 0.25:
        extra = rng.choice((1, 511, 512, 4096, layout.unit, rng.randrange(1, 1 << 17)))
        filler = bytes(extra) if rng.random() < 0.5 else rng.randbytes(extra)
        return data + filler, f"extended by {extra} bytes"
    points = [0, 1, 511, 512, 4096, n - 1, n - 512, n - 1024, rng.randrange(max(1, n))]
    points += [s + d for s in layout.structures for d in (0, 1, 8)]
    for t in layout.tables:
        points.append(t.offset + rng.randrange(1, max(2, t.count * struct.calcsize(t.fmt))))
    cut = max(0, min(n, rng.choice(points)))
    return data[:cut], f"truncated to {cut} bytes (from {n})"


def _havoc(data: bytearray, layout: Layout, rng: random.Random, directory: Path,
           spec: CaseSpec) -> tuple[bytearray, str]:
    if not data:
        return data, "havoc on an empty file: nothing"
    base = rng.choice([0, *layout.structures]) if layout.structures else 0
    span = min(len(data), 4096)
    changed = []
    for _ in range(rng.randint(1, 16)):
        at = min(len(data) - 1, max(0, base + rng.randrange(span)))
        data[at] = rng.choice((0, 0xFF, 0x80, 0x7F, data[at] ^ (1 << rng.randrange(8)),
                               rng.randrange(256)))
        changed.append(at)
    return data, f"havoc near {base:#x}: {len(changed)} bytes"


def _overlap(data: bytearray, layout: Layout, rng: random.Random, directory: Path,
             spec: CaseSpec) -> tuple[bytearray, str]:
    spots = [s for s in layout.structures if 0 <= s < len(data)]
    spots += [t.offset for t in layout.tables if 0 <= t.offset < len(data)]
    if len(spots) < 2:
        return _havoc(data, layout, rng, directory, spec)
    src, dst = rng.sample(spots, 2)
    length = min(rng.choice((16, 512, 4096)), len(data) - src, len(data) - dst)
    data[dst : dst + length] = data[src : src + length]
    return data, f"overlap: {length} bytes of {src:#x} copied over {dst:#x}"
