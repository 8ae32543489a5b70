"""QEMU ``json:{...}`` references parsed in memory (vdiskfs.block.jsonref): the nested and the
flattened forms, every protocol's options, and every malformed or refused input named by image
and field, never a traceback."""

from __future__ import annotations

import json

import pytest

from vdiskfs.block.jsonref import (
    MAX_JSON_LENGTH,
    JsonReference,
    parse_json_reference,
    redact_json_reference,
)
from vdiskfs.block.registry import redact_url
from vdiskfs.errors import FormatError, UnsupportedError

FORMATS = ("qcow2", "raw", "vmdk", "qed")


def parse(reference: str | dict[str, object]) -> JsonReference:
    if not isinstance(reference, str):
        reference = "json:" + json.dumps(reference)
    return parse_json_reference(reference, formats=FORMATS, path="/img/top.qcow2",
                                field="backing_file")


@pytest.mark.parametrize(("options", "expected"), [
    # The two forms: nested, and flattened dotted keys.
    ({"driver": "qcow2", "file": {"driver": "https", "url": "https://h/base.qcow2"}},
     JsonReference("https://h/base.qcow2", "qcow2")),
    ({"file.driver": "nbd", "file.server.type": "inet", "file.server.host": "127.0.0.1",
      "file.server.port": "10809", "file.export": "x"},
     JsonReference("nbd://127.0.0.1:10809/x", None)),
    # Mixed nesting means the same.
    ({"driver": "raw", "file": {"driver": "nbd", "server.type": "inet",
                                "server": {"host": "h"}, "export": "a b/c"}},
     JsonReference("nbd://h:10809/a%20b%2Fc", "raw")),
    ({"driver": "qcow2", "file": {"driver": "nbd", "server": {"type": "unix",
                                                             "path": "/run/n.sock"}}},
     JsonReference("nbd+unix:///?socket=/run/n.sock", "qcow2")),
    ({"driver": "qcow2", "file": {"driver": "nbd", "server": {
        "type": "inet", "host": "::1", "port": 7000}, "export": "d"}},
     JsonReference("nbd://[::1]:7000/d", "qcow2")),
    # Legacy nbd host/port/path.
    ({"file": {"driver": "nbd", "host": "h", "port": "10810", "export": "e"}},
     JsonReference("nbd://h:10810/e", None)),
    ({"file": {"driver": "nbd", "path": "/s", "export": "e"}},
     JsonReference("nbd+unix:///e?socket=/s", None)),
    ({"driver": "vmdk", "file": {"driver": "file", "filename": "base.vmdk"}},
     JsonReference("file:base.vmdk", "vmdk")),
    # A protocol at the top: no format layer, nothing probed.
    ({"driver": "http", "url": "http://h/x.img"}, JsonReference("http://h/x.img", "raw")),
    ({"driver": "https", "url": "HTTPS://h/x.img", "sslverify": True},
     JsonReference("HTTPS://h/x.img", "raw")),
    ({"driver": "file", "filename": "/abs/x.raw"}, JsonReference("file:/abs/x.raw", "raw")),
    # A filename without a driver: the protocol comes from its prefix.
    ({"driver": "qcow2", "filename": "nbd://h/x"}, JsonReference("nbd://h/x", "qcow2")),
    ({"file.filename": "base.qcow2"}, JsonReference("base.qcow2", None)),
])
def test_parsed(options: dict[str, object], expected: JsonReference) -> None:
    assert parse(options) == expected


@pytest.mark.parametrize(("reference", "match"), [
    ("json:", "not valid JSON"),
    ("json:{", "not valid JSON"),
    ('json:{"driver": "qcow2", "driver": "raw"}', "given twice"),
    ("json:[1]", "must be a JSON object, not an array"),
    ('json:"x"', "must be a JSON object, not a string"),
    ("json:null", "must be a JSON object, not null"),
    ('json:{"file": {"driver": "file", "filename": NaN}}', "not valid JSON"),
    ('json:{"file": {"driver": "file", "filename": 7}}',
     "'file.filename' must be a string, not a number"),
    ('json:{"file": {"driver": "file", "filename": null}}', "must be a string, number"),
    ('json:{"file": {"driver": "file", "filename": ["a"]}}', "not an array"),
    ('json:{"driver": 1, "file.filename": "x"}', "'driver' must be a string"),
    ('json:{"file": {"driver": "file"}, "file.driver": "file"}', "'file.driver' is given twice"),
    ('json:{"driver": "qcow2"}', "names no protocol child"),
    ('json:{"file": {"url": "https://h/x"}}', "'file.driver' is missing"),
    ('json:{"file": {"driver": "https"}}', "'file.url' is missing"),
    ('json:{"file": {"driver": "https", "url": "http://h/x"}}', "does not start with 'https://'"),
    ('json:{"file": {"driver": "nbd", "export": "x"}}', "'file.server' is missing"),
    ('json:{"file": {"driver": "nbd", "server": {"host": "h"}}}', "'file.server.type' is missing"),
    ('json:{"file": {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "0"}}}',
     "port number"),
    ('json:{"file": {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": true}}}',
     "port number"),
    ('json:{"file": {"driver": "nbd", "server": {"type": "inet", "host": "a/b"}}}',
     "not a host name"),
    ('json:{"file": {"driver": "nbd", "host": "h", "server": {"type": "inet", "host": "h"}}}',
     "legacy"),
    ('json:{"file": {"driver": "https", "url": "https://h/x", "sslverify": "maybe"}}',
     "must be true or false"),
    ('json:{"file": {"driver": "file", "filename": "a\\u0000b"}}', "NUL"),
    ('json:{"": "x"}', "empty key"),
    ("json:" + "{\"a\":" * 20 + "1" + "}" * 20, "nested 20 deep"),
    ("json:" + "[" * 4000, "nested 4000 deep"),
    ('json:{"file.filename": "' + "a" * MAX_JSON_LENGTH + '"}', "characters of JSON"),
])
def test_malformed_is_a_format_error_naming_image_and_field(reference: str, match: str) -> None:
    with pytest.raises(FormatError, match=match) as info:
        parse(reference)
    assert str(info.value).startswith("/img/top.qcow2: field backing_file: json: reference: ")


@pytest.mark.parametrize(("options", "match"), [
    # An image may not switch off TLS verification, in either spelling.
    ({"file": {"driver": "https", "url": "https://h/x", "sslverify": False}},
     "'file.sslverify' is off: an image may not switch off TLS verification"),
    ({"file.driver": "https", "file.url": "https://h/x", "file.sslverify": "off"},
     "'file.sslverify' is off"),
    ({"driver": "https", "url": "https://h/x", "sslverify": False}, "'sslverify' is off"),
    ({"file": {"driver": "https", "url": "https://h/x", "cookie": "a=b"}},
     "'file.cookie' is not supported \\(cookies"),
    ({"file": {"driver": "https", "url": "https://h/x", "proxy-username": "u"}},
     "'file.proxy-username' is not supported \\(proxies"),
    ({"file": {"driver": "https", "url": "https://h/x", "password-secret": "s"}},
     "'file.password-secret'"),
    ({"file": {"driver": "https", "url": "https://h/x", "colour": "red"}},
     "'file.colour' is not supported \\(unknown option\\)"),
    ({"file": {"driver": "nbd", "server": {"type": "inet", "host": "h"}, "tls-creds": "t"}},
     "'file.tls-creds' is not supported"),
    ({"file": {"driver": "nbd", "server": {"type": "vsock", "cid": "3"}}},
     "'file.server.type' 'vsock' is not supported"),
    ({"file": {"driver": "nbd", "server": {"type": "inet", "host": "h", "ipv6": True}}},
     "'file.server.ipv6' is not supported"),
    ({"file": {"driver": "file", "filename": "x", "locking": "off"}},
     "'file.locking' is not supported"),
    ({"file": {"driver": "ssh", "path": "/x"}}, "protocol driver 'ssh'"),
    ({"file": {"driver": "qcow2", "file.filename": "x"}}, "protocol driver 'qcow2'"),
    ({"driver": "qcow2", "discard": "unmap", "file.filename": "x"}, "'discard' is not supported"),
    ({"driver": "gluster", "url": "gluster://h/x"}, "driver 'gluster' is not supported"),
])
def test_unsupported_options_are_refused_by_name(options: dict[str, object], match: str) -> None:
    with pytest.raises(UnsupportedError, match=match) as info:
        parse(options)
    assert info.value.field == "backing_file" and info.value.path == "/img/top.qcow2"


def test_redaction_hides_credentials_anywhere_in_the_json() -> None:
    reference = ('json:{"driver": "qcow2", "file": {"driver": "https", '
                 '"url": "https://user:pw@h/x"}}')
    shown = redact_json_reference(reference, redact_url)
    assert "pw" not in shown and "user:***@h/x" in shown
    # JSON escapes cannot smuggle the password past the redaction.
    escaped = 'json:{"file.driver": "https", "file.url": "https:\\/\\/u:pw\\u0040h/x"}'
    assert "pw" not in redact_json_reference(escaped, redact_url)
    # Text that does not parse is not shown at all.
    assert redact_json_reference('json:{"url": "https://u:pw@h', redact_url) == "json:{...}"
    assert redact_json_reference("json:" + "[" * 100000, redact_url) == "json:{...}"
