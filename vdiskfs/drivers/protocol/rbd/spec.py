"""QEMU's name of an RBD image: ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE]...``.

Pure parsing, no I/O, as QEMU's ``qemu_rbd_parse_filename`` (block/rbd.c): a backslash escapes
the next character (``\\:`` is a colon in a name), ``conf=FILE`` is the Ceph configuration file,
``id=USER`` the cephx user without ``client.`` (``admin`` by default), ``keyring=FILE`` its
keyring; any other ``KEY=VALUE`` is a Ceph option set on the connection (``mon_host=...``), as
QEMU passes it to ``rados_conf_set``. A secret in the name itself (``key=``) is refused: names
are shown in ``info``, logs and the process table, so secrets belong in a keyring file.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vdiskfs.errors import VdiskError

__all__ = ["RbdSpec", "parse_spec", "snapshot_name"]

PREFIX = "rbd:"
#: Options that would put a secret in the name.
_SECRET_OPTIONS = ("key", "password-secret", "secret")


@dataclass(frozen=True, slots=True)
class RbdSpec:
    """Where an RBD image is and how to reach its cluster."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    #: The cephx user without ``client.`` (``id=``); None: librados's default (``admin``).
    user: str | None = None
    keyring: str | None = None
    #: Other Ceph options, in the order given (``rados_conf_set``).
    options: tuple[tuple[str, str], ...] = ()

    @property
    def stem(self) -> str:
        """The mounted file's name without ``.raw``: ``IMAGE`` or ``IMAGE@SNAP``."""
        name = self.image if self.snapshot is None else f"{self.image}@{self.snapshot}"
        return name.replace("/", "_").replace("\0", "_")

    @property
    def where(self) -> str:
        """``POOL/[NAMESPACE/]IMAGE[@SNAP]``, for messages."""
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snapshot}" if self.snapshot is not None else ""
        return f"{self.pool}/{ns}{self.image}{snap}"


def _split(text: str, delimiter: str) -> tuple[str, str | None]:
    """``text`` up to the first unescaped ``delimiter`` (still escaped) and the rest after it
    (None when there is none): QEMU's ``qemu_rbd_next_tok``."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == delimiter:
            return text[:i], text[i + 1 :]
        i += 1
    return text, None


def _unescape(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_spec(name: str) -> RbdSpec:
    """Parse ``rbd:...``; a malformed name raises :class:`VdiskError` (EINVAL) saying what is
    wrong with it."""

    def bad(message: str) -> VdiskError:
        return VdiskError(f"bad rbd: name: {message}", path=name, errno=errno.EINVAL)

    if not name.startswith(PREFIX):
        raise bad("does not start with rbd:")
    if "\0" in name:
        raise bad("contains a NUL")
    location, rest = _split(name[len(PREFIX) :], ":")
    pool, path = _split(location, "/")
    if path is None:
        raise bad("no image (rbd:POOL/IMAGE)")
    namespace = ""
    first, after = _split(path, "/")
    if after is not None:
        namespace, path = first, after
        if _split(path, "/")[1] is not None:
            raise bad("too many / (rbd:POOL/NAMESPACE/IMAGE at most)")
    image, snapshot = _split(path, "@")
    fields: dict[str, str] = {}
    options: list[tuple[str, str]] = []
    while rest is not None:
        item, rest = _split(rest, ":")
        key, value = _split(item, "=")
        key = _unescape(key)
        if value is None:
            raise bad(f"option {key!r} has no value (KEY=VALUE)")
        value = _unescape(value)
        if key in _SECRET_OPTIONS:
            raise bad(f"{key}= would put a secret in the name; give keyring=FILE instead")
        if key in ("conf", "id", "keyring"):
            if key in fields:
                raise bad(f"{key}= given twice")
            fields[key] = value
        elif key in ("pool", "image", "snapshot", "namespace", "user"):
            raise bad(f"{key}= is not an option of the rbd: name (rbd:POOL/IMAGE@SNAP)")
        else:
            options.append((key, value))
    parts = {"pool": _unescape(pool), "image": _unescape(image),
             "namespace": _unescape(namespace)}
    for what in ("pool", "image"):
        if not parts[what]:
            raise bad(f"empty {what} name")
    snap = None if snapshot is None else _unescape(snapshot)
    if snap == "":
        raise bad("empty snapshot name after @")
    for what in ("conf", "id", "keyring"):
        if fields.get(what) == "":
            raise bad(f"empty {what}=")
    return RbdSpec(pool=parts["pool"], image=parts["image"], namespace=parts["namespace"],
                   snapshot=snap, conf=fields.get("conf"), user=fields.get("id"),
                   keyring=fields.get("keyring"), options=tuple(options))


def snapshot_name(name: str, snapshot: str) -> str:
    """``name`` (``rbd:POOL/IMAGE[:OPTIONS]``, no snapshot in it) naming the image's
    ``snapshot`` instead: ``rbd:POOL/IMAGE@SNAP[:OPTIONS]``, the snapshot's name escaped."""
    location, rest = _split(name[len(PREFIX) :], ":")
    escaped = "".join(f"\\{c}" if c in "\\:@/" else c for c in snapshot)
    options = "" if rest is None else f":{rest}"
    return f"{PREFIX}{location}@{escaped}{options}"
