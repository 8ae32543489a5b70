"""A mount option is declared once, as a MountRequest field: the parser offers it, the parsed
arguments give the field its value, and the request reaches the background daemon whole."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from vdiskfs.cli import _build_parser
from vdiskfs.cliopts import Option, fields_of
from vdiskfs.mountargs import MountRequest
from vdiskfs.urlargs import RemoteOptions

OPTIONS = fields_of(MountRequest)
REMOTE = {f.name for f in dataclasses.fields(RemoteOptions)}


def _parse(*argv: str) -> argparse.Namespace:
    return _build_parser(["mount"]).parse_args(["mount", *argv])


def _value(request: MountRequest, name: str) -> Any:
    """A field of the request, or of its nested remote options."""
    return getattr(request.remote if name in REMOTE else request, name)


def _command_line(spec: Option) -> tuple[list[str], Any]:
    """Arguments that set the option to something else than its default, and that value."""
    action = spec.settings.get("action")
    if action == "store_true":
        return [spec.flags[0]], True
    if action == "store_false":
        return [spec.flags[0]], False
    if action is argparse.BooleanOptionalAction:
        return [spec.flags[0]], True
    value = spec.settings["choices"][-1] if "choices" in spec.settings else "/some/where"
    return [spec.flags[0], value], value


def test_the_defaults_of_the_parser_are_the_fields_defaults() -> None:
    assert MountRequest.from_args(_parse("a.qcow2", "mnt"), ["a.qcow2"], "mnt") == \
        MountRequest(["a.qcow2"], "mnt")


def test_option_names_are_unique_across_nested_options() -> None:
    # The parsed namespace is flat: a nested field may not share a name with another.
    names = [f.name for f, _ in OPTIONS]
    assert len(names) == len(set(names)) and {"writable", "ca_file"} <= set(names)


@pytest.mark.parametrize(("field", "spec"), OPTIONS, ids=[f.name for f, _ in OPTIONS])
def test_every_field_is_an_option_of_mount(field: dataclasses.Field[Any], spec: Option) -> None:
    argv, value = _command_line(spec)
    request = MountRequest.from_args(_parse(*argv, "a.qcow2", "mnt"), ["a.qcow2"], "mnt")
    assert _value(request, field.name) == value != field.default


def test_every_field_reaches_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the background mount writes on its daemon's stdin: every option of the command
    line, file names absolute (the daemon must not depend on the caller's directory), URLs and
    their credentials as they are."""
    monkeypatch.chdir(tmp_path)
    argv = [arg for _, spec in OPTIONS for arg in _command_line(spec)[0]
            if arg != "--rw"]  # --rw and --overlay exclude each other
    url = "https://user:secret@host/disk.qcow2"
    args = _parse(*argv, "local.qcow2", url, "mnt")
    request = MountRequest.from_args(args, ["local.qcow2", url], "mnt")
    for f, _ in OPTIONS:
        assert _value(request, f.name) != f.default or f.name == "writable", f.name

    received = MountRequest.from_json(request.to_json())
    assert received.images == [str(tmp_path / "local.qcow2"), url]
    assert received.mountpoint == str(tmp_path / "mnt")
    assert received.overlay == received.remote.ca_file == "/some/where"
    absolute = dataclasses.replace(request, images=received.images,
                                   mountpoint=received.mountpoint)
    assert received == absolute
    assert json.loads(request.to_json())["remote"]["verify_tls"] is False


def test_relative_option_paths_become_absolute_for_the_daemon(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.chdir(tmp_path)
    request = MountRequest.from_args(
        _parse("--overlay", "new.qcow2", "--cache-dir", "cache", "a.raw", "mnt"),
        ["a.raw"], "mnt")
    received = MountRequest.from_json(request.to_json())
    assert received.overlay == os.path.join(tmp_path, "new.qcow2")
    assert received.remote.cache_dir == os.path.join(tmp_path, "cache")
    assert received.remote.ca_file is None
