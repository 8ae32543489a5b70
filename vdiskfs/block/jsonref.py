"""QEMU's ``json:{...}`` pseudo-protocol references, turned into a name the registry opens.

QEMU records a backing file it could not name by a plain path or URL as ``json:`` followed by
the block options of the node (``block.c: parse_json_filename``): nested objects
(``{"driver": "qcow2", "file": {"driver": "https", "url": ...}}``) and flattened dotted keys
(``{"file.driver": "nbd", "file.server.host": ...}``) mean the same, as ``qdict_flatten`` makes
them. This module understands the options of the protocols vdiskfs has -- ``file``
(``filename``), ``http``/``https`` (``url``, ``block/curl.c``) and ``nbd`` (``server`` of type
``inet`` or ``unix`` plus ``export``, and the legacy ``host``/``port``/``path``,
``block/nbd.c``) -- and a top-level format ``driver``. It is a pure function of the text: no
file or network is touched here.

Every other option is refused by name rather than ignored: an option we do not implement would
silently change what is read, and some change security (curl's ``sslverify: false`` would let
an image switch off TLS verification, ``cookie`` and proxy options would send secrets).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["MAX_JSON_DEPTH", "MAX_JSON_LENGTH", "JsonReference", "parse_json_reference",
           "redact_json_reference"]

PREFIX = "json:"
#: Longest ``json:`` reference accepted: QEMU keeps filenames in PATH_MAX buffers.
MAX_JSON_LENGTH = 4096
#: Deepest nesting of objects accepted (``{"file": {"server": {...}}}`` is 3 deep); checked
#: before parsing, so a hostile ``[[[[...`` never reaches the recursive parser.
MAX_JSON_DEPTH = 8

#: Protocol drivers whose options are understood here.
PROTOCOLS = ("file", "http", "https", "nbd")
#: ``curl`` options that QEMU knows and vdiskfs refuses: the reason is named in the error.
_CURL_REFUSED = {
    "username": "credentials belong in the URL or a netrc file",
    "password-secret": "credentials belong in the URL or a netrc file",
    "proxy-username": "proxies are not supported",
    "proxy-password-secret": "proxies are not supported",
    "cookie": "cookies are not supported",
    "cookie-secret": "cookies are not supported",
    "readahead": "the read cache does readahead itself",
    "timeout": "timeouts are not set per image",
}
#: Keys of an ``inet`` / ``unix`` NBD server address that are honoured.
_INET_KEYS = ("type", "host", "port")
_UNIX_KEYS = ("type", "path")
_LEGACY_NBD_KEYS = ("host", "port", "path")


@dataclass(frozen=True, slots=True)
class JsonReference:
    """What a ``json:`` reference names: ``name``, a URL or a ``file:`` path (relative names
    resolve against the referring image, as plain references do), and the ``format`` driver it
    states (None: not stated, the recorded format or probing decides)."""

    name: str
    format: str | None


def parse_json_reference(reference: str, *, formats: Collection[str], path: str,
                         field: str) -> JsonReference:
    """Parse ``reference`` (starting ``json:``), recorded in the image ``path`` in its
    ``field``, knowing the format driver names ``formats``.

    Raises :class:`FormatError` for text that is not such a reference (bad JSON, wrong types,
    not an object, too long or too deep) and :class:`UnsupportedError` naming the option for
    anything vdiskfs does not implement.
    """

    def bad(message: str) -> FormatError:
        return FormatError(f"json: reference: {message}", path=path, field=field)

    def refuse(message: str) -> UnsupportedError:
        return UnsupportedError(f"json: reference: {message}", path=path, field=field)

    if not reference.startswith(PREFIX):
        raise bad("does not start with 'json:'")
    text = reference[len(PREFIX):]
    if len(text) > MAX_JSON_LENGTH:
        raise bad(f"{len(text)} characters of JSON (at most {MAX_JSON_LENGTH})")
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise bad(f"nested {depth} deep (at most {MAX_JSON_DEPTH})")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise bad(f"must be a JSON object, not {_type_name(value)}")
    options = _flatten(value, "", bad)

    driver = _string(options, "driver", bad, required=False)
    if driver is None or driver in formats:
        # A format (stated or probed) over a protocol child: the child's options are under
        # "file.", or its name is the top-level "filename" (QEMU's bdrv_open_inherit).
        child = {key[len("file."):]: v for key, v in options.items() if key.startswith("file.")}
        for key in options:
            if not key.startswith("file.") and key not in ("driver", "filename"):
                raise refuse(f"option {key!r} is not supported")
        if "filename" in options:
            if child:
                raise bad("both 'filename' and 'file' name the protocol child")
            child = {"filename": options["filename"]}
        if not child:
            raise bad("names no protocol child ('file' or 'filename')")
        return JsonReference(_protocol(child, "file.", bad, refuse), driver)
    if driver in PROTOCOLS:
        # A protocol at the top: QEMU opens that node alone, with no format layer above it,
        # so nothing is probed -- the bytes are read as they are.
        return JsonReference(_protocol(options, "", bad, refuse), "raw")
    raise refuse(f"driver {driver!r} is not supported (formats: {', '.join(sorted(formats))}; "
                 f"protocols: {', '.join(PROTOCOLS)})")


def redact_json_reference(reference: str, redact: Callable[[str], str]) -> str:
    """``reference`` (``json:...``) safe to show: ``redact`` applied to every string value (it
    hides a URL's credentials), and unparseable text not shown at all (it could hold anything)."""
    try:
        if len(reference) - len(PREFIX) > MAX_JSON_LENGTH or \
                _max_depth(reference[len(PREFIX):]) > MAX_JSON_DEPTH:
            raise ValueError
        value = json.loads(reference[len(PREFIX):], parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return PREFIX + "{...}"

    def walk(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: walk(v) for key, v in item.items()}
        if isinstance(item, list):
            return [walk(v) for v in item]
        return redact(item) if isinstance(item, str) else item

    return PREFIX + json.dumps(walk(value), separators=(", ", ": "))


# -- the protocols ---------------------------------------------------------------------------------


def _protocol(options: dict[str, Any], prefix: str, bad: Callable[[str], FormatError],
              refuse: Callable[[str], UnsupportedError]) -> str:
    """The name (URL or ``file:`` path) of the protocol node that ``options`` describe; keys are
    shown with ``prefix``, as the image spells them."""

    def string(key: str, *, required: bool = True) -> str | None:
        return _string(options, key, bad, prefix=prefix, required=required)

    def only(*known: str) -> None:
        for key in options:
            if key not in known:
                raise refuse(f"option {prefix + key!r} is not supported")

    driver = string("driver", required=False)
    if driver is None:
        # QEMU picks the protocol from the filename's prefix (bdrv_find_protocol): the name is
        # then an ordinary reference, URL or path.
        if "filename" not in options:
            raise bad(f"{prefix + 'driver'!r} is missing")
        only("filename")
        name = string("filename")
        assert name is not None
        return name
    if driver == "file":
        only("driver", "filename")
        name = string("filename")
        assert name is not None
        # "file:" keeps a local name that looks like a URL ("nbd://x" as a file name) local.
        return "file:" + name
    if driver in ("http", "https"):
        return _curl(options, driver, prefix, bad, refuse)
    if driver == "nbd":
        return _nbd(options, prefix, bad, refuse)
    raise refuse(f"protocol driver {driver!r} (in {prefix + 'driver'!r}) is not supported "
                 f"(supported: {', '.join(PROTOCOLS)})")


def _curl(options: dict[str, Any], driver: str, prefix: str, bad: Callable[[str], FormatError],
          refuse: Callable[[str], UnsupportedError]) -> str:
    for key, value in options.items():
        if key in ("driver", "url"):
            continue
        if key == "sslverify":
            # QEMU's curl driver takes a bool (or "on"/"off" once flattened to strings).
            if value is True or value == "on":
                continue
            if value is False or value == "off":
                raise refuse(f"{prefix + key!r} is off: an image may not switch off TLS "
                             "verification (use --no-verify-tls to do it yourself)")
            raise bad(f"{prefix + key!r} must be true or false, not {value!r}")
        reason = _CURL_REFUSED.get(key, "unknown option")
        raise refuse(f"option {prefix + key!r} is not supported ({reason})")
    url = _string(options, "url", bad, prefix=prefix)
    assert url is not None
    # As curl.c: the driver and the URL's scheme must agree.
    if not url.lower().startswith(f"{driver}://"):
        raise bad(f"{prefix + 'url'!r} does not start with '{driver}://' as driver "
                  f"{driver!r} requires")
    return url


def _nbd(options: dict[str, Any], prefix: str, bad: Callable[[str], FormatError],
         refuse: Callable[[str], UnsupportedError]) -> str:
    server = {key[len("server."):]: v for key, v in options.items() if key.startswith("server.")}
    legacy = {key: v for key, v in options.items() if key in _LEGACY_NBD_KEYS}
    for key in options:
        if key not in ("driver", "export", *_LEGACY_NBD_KEYS) and not key.startswith("server."):
            raise refuse(f"option {prefix + key!r} is not supported")
    if server and legacy:
        raise bad(f"both {prefix + 'server'!r} and the legacy {', '.join(sorted(legacy))} "
                  "name the server")
    if legacy:
        # The legacy form: "path" is a Unix socket, else host and port (block/nbd.c).
        server = {**legacy, "type": "unix" if "path" in legacy else "inet"}
        where = prefix
    else:
        where = prefix + "server."
    if not server:
        raise bad(f"{prefix + 'server'!r} is missing")
    export = _string(options, "export", bad, prefix=prefix, required=False) or ""
    path_part = "/" + urllib.parse.quote(export, safe="")
    kind = _string(server, "type", bad, prefix=where)
    if kind == "unix":
        for key in server:
            if key not in _UNIX_KEYS:
                raise refuse(f"option {where + key!r} is not supported")
        socket = _string(server, "path", bad, prefix=where)
        assert socket is not None
        if not socket:
            raise bad(f"{where + 'path'!r} is empty")
        return f"nbd+unix://{path_part}?socket={urllib.parse.quote(socket, safe='/')}"
    if kind != "inet":
        raise refuse(f"{where + 'type'!r} {kind!r} is not supported (inet or unix)")
    for key in server:
        if key not in _INET_KEYS:
            raise refuse(f"option {where + key!r} is not supported")
    host = _string(server, "host", bad, prefix=where)
    assert host is not None
    if not host or any(c in host for c in "/?#@[]%\\ "):
        raise bad(f"{where + 'host'!r} {host!r} is not a host name or address")
    port = server.get("port", 10809)
    # QAPI's InetSocketAddress.port is a string; a JSON number is taken too.
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise bad(f"{where + 'port'!r} must be a port number from 1 to 65535, not {port!r}")
    shown = f"[{host}]" if ":" in host else host
    return f"nbd://{shown}:{port}{path_part}"


# -- JSON helpers ----------------------------------------------------------------------------------


def _string(options: dict[str, Any], key: str, bad: Callable[[str], FormatError], *,
            prefix: str = "", required: bool = True) -> str | None:
    value = options.get(key)
    if value is None:
        if required:
            raise bad(f"{prefix + key!r} is missing")
        return None
    if not isinstance(value, str):
        raise bad(f"{prefix + key!r} must be a string, not {_type_name(value)}")
    if "\0" in value:
        raise bad(f"{prefix + key!r} contains a NUL character")
    return value


def _flatten(value: dict[str, Any], prefix: str,
             bad: Callable[[str], FormatError]) -> dict[str, Any]:
    """Nested objects as dotted keys, as QEMU's ``qdict_flatten``; a key given both ways is an
    error rather than one of them silently winning."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = prefix + key
        pairs: Iterable[tuple[str, Any]]
        if not key:
            raise bad(f"an empty key in {prefix[:-1] or 'the top-level object'!r}")
        if isinstance(item, dict):
            pairs = _flatten(item, name + ".", bad).items()
        elif isinstance(item, (str, int, float, bool)):
            pairs = [(name, item)]
        else:
            raise bad(f"{name!r} must be a string, number, boolean or object, not "
                      f"{_type_name(item)}")
        for flat, v in pairs:
            if flat in out:
                raise bad(f"{flat!r} is given twice")
            out[flat] = v
    return out


def _max_depth(text: str) -> int:
    """How deeply ``[``/``{`` nest in ``text``, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), "?")
