"""Command-line handling shared by every command that opens images by URL (``mount``, ``info``,
``boot``): the options of remote images (TLS, the read cache), each declared once as a field of
:class:`RemoteOptions` (:mod:`vdiskfs.cliopts`), and a URL's credentials kept out of the process
title.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vdiskfs.block.context import OpenOptions
from vdiskfs.block.registry import redact_url, url_scheme
from vdiskfs.cliopts import add_options, from_args, option

__all__ = ["RemoteOptions", "add_remote_arguments", "has_credentials", "hide_credentials",
           "protocol_kind"]


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of images opened by URL: TLS verification, the read cache."""
    add_options(parser, RemoteOptions)


@dataclass(frozen=True)
class RemoteOptions:
    """What :func:`add_remote_arguments` parsed: the part of :class:`OpenOptions` that only
    images opened by URL use (each field is the :class:`OpenOptions` field of its name)."""

    ca_file: str | None = field(default=None, metadata=option(
        "--ca-file", metavar="FILE", path=True,
        help="https (and s3 over https): verify the server with the CA certificates in FILE "
        "(PEM) instead of the system's"))
    verify_tls: bool = field(default=True, metadata=option(
        "--no-verify-tls", action="store_false",
        help="https (and s3 over https): do not verify the server's certificate"))
    cache: bool = field(default=True, metadata=option(
        "--no-cache", action="store_false",
        help="URLs: no read cache over the remote image (every read goes to the server)"))
    cache_dir: str | None = field(default=None, metadata=option(
        "--cache-dir", metavar="DIR", path=True,
        help="URLs: keep the blocks read from http(s) and s3 images in DIR too, for the next "
        "open of the same URL"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RemoteOptions:
        return from_args(cls, args)

    def open_options(self, **options: Any) -> OpenOptions:
        """:class:`OpenOptions` with these and the other ``options`` (read_only, format...)."""
        return OpenOptions(**dataclasses.asdict(self), **options)


def protocol_kind(path: str) -> str:
    """What messages call the protocol of the URL ``path``: ``http(s)`` for both of those,
    else its scheme (``s3``, ``nbd``)."""
    scheme = url_scheme(path) or "file"
    return "http(s)" if scheme in ("http", "https") else scheme


def has_credentials(path: str) -> bool:
    """Whether ``path`` is a URL with a user name (and maybe a password) in it."""
    return url_scheme(path) is not None and "@" in path.partition("://")[2].partition("/")[0]


def hide_credentials(argv: Sequence[str] | None = None) -> None:
    """Give this process a title without the credentials of the URLs in its command line.

    ``ps`` and ``/proc/PID/cmdline`` show every process's arguments to every user, for as long
    as it runs: a ``boot`` or a foreground ``mount`` of ``https://user:password@host/...``
    would show the password. The title (``setproctitle`` rewrites the memory the kernel reads
    the command line from) keeps the arguments with the credentials replaced. Between the
    start and this call the arguments are visible: a netrc file avoids that window.
    """
    argv = list(sys.orig_argv if argv is None else argv)
    shown = [redact_url(arg) for arg in argv]
    if shown != argv:
        import setproctitle

        setproctitle.setproctitle(" ".join(shown))
