"""Dataclass fields that are command-line options too: a field declares its option once, and
the parser, reading the parsed namespace back, and handing the whole to another process (a
background mount's daemon) follow from the fields.

A field's ``metadata`` says what it is: :func:`option` (its flags and ``add_argument``'s
settings; ``dest`` is the field's name and ``default`` the field's default), :func:`path` (a
file name that another process gets absolute), or :data:`NESTED` (a field whose default factory
is another such dataclass, whose options are this one's too).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from vdiskfs.block.registry import url_scheme

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["NESTED", "Option", "add_options", "fields_of", "from_args", "from_plain", "option",
           "path", "to_plain"]

D = TypeVar("D", bound="DataclassInstance")

_OPTION = "vdiskfs.option"
_PATH = "vdiskfs.path"
_NESTED = "vdiskfs.nested"
#: The metadata of a field that holds another options dataclass (its ``default_factory``).
NESTED: Mapping[str, Any] = {_NESTED: True}


@dataclasses.dataclass(frozen=True)
class Option:
    """A field's option: ``add_argument(*flags, **settings)``, in an ``exclusive`` group."""

    flags: tuple[str, ...]
    settings: dict[str, Any]
    exclusive: str | None


def option(*flags: str, exclusive: str | None = None, path: bool = False,
           **settings: Any) -> Mapping[str, Any]:
    """The metadata of a field that is the option ``flags``: ``settings`` go to
    ``add_argument`` (help, action, metavar...); options of one ``exclusive`` name exclude each
    other; ``path``: see :func:`path`."""
    return {_OPTION: Option(flags, settings, exclusive), _PATH: path}


def path() -> Mapping[str, Any]:
    """The metadata of a file name (a ``str`` or a list of them) that :func:`to_plain` makes
    absolute: the receiving process must not depend on the sender's directory. URLs stay."""
    return {_PATH: True}


def fields_of(cls: type[DataclassInstance]) -> list[tuple[dataclasses.Field[Any], Option]]:
    """Every field of ``cls`` that is an option, nested ones included, with its option."""
    out: list[tuple[dataclasses.Field[Any], Option]] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get(_NESTED):
            out += fields_of(_nested_class(f))
        elif (spec := f.metadata.get(_OPTION)) is not None:
            out.append((f, spec))
    return out


def add_options(parser: argparse.ArgumentParser, cls: type[DataclassInstance]) -> None:
    """Add the options of ``cls``'s fields to ``parser``."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f, spec in fields_of(cls):
        target: argparse._ActionsContainer = parser
        if spec.exclusive is not None:
            target = groups.get(spec.exclusive) or groups.setdefault(
                spec.exclusive, parser.add_mutually_exclusive_group())
        target.add_argument(*spec.flags, dest=f.name, default=f.default, **spec.settings)


def from_args(cls: type[D], args: argparse.Namespace, **given: Any) -> D:
    """An instance of ``cls`` from what :func:`add_options` parsed, and the ``given`` fields
    (those without an option: positional arguments)."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        if f.metadata.get(_NESTED):
            values[f.name] = from_args(_nested_class(f), args)
        elif _OPTION in f.metadata:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def to_plain(obj: DataclassInstance) -> dict[str, Any]:
    """The fields as JSON values (nested options as objects), file names absolute."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(_NESTED):
            value = to_plain(value)
        elif f.metadata.get(_PATH):
            value = [_absolute(v) for v in value] if isinstance(value, list) else _absolute(value)
        out[f.name] = value
    return out


def from_plain(cls: type[D], data: Mapping[str, Any]) -> D:
    """The instance :func:`to_plain` described."""
    values = dict(data)
    for f in dataclasses.fields(cls):
        if f.metadata.get(_NESTED) and f.name in values:
            values[f.name] = from_plain(_nested_class(f), values[f.name])
    return cls(**values)


def _nested_class(f: dataclasses.Field[Any]) -> type[DataclassInstance]:
    cls = f.default_factory
    assert isinstance(cls, type) and dataclasses.is_dataclass(cls), f.name
    return cls


def _absolute(name: str | None) -> str | None:
    if not name or url_scheme(name) is not None:
        return name
    return os.path.abspath(name)
