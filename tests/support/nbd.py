"""NBD servers for tests: ``qemu-nbd`` (and ``nbdkit``) on 127.0.0.1 or a Unix socket, as a
subprocess that is always killed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
NBDKIT = shutil.which("nbdkit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    """A server process; ``url`` names its export. ``start`` waits until it accepts."""

    def __init__(self, argv: list[str], url: str, address: tuple[str, int] | str) -> None:
        self.argv = argv
        self.url = url
        self.address = address
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"{' '.join(self.argv)} exited: {err}")
            family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
            with socket.socket(family) as s, contextlib.suppress(OSError):
                s.connect(self.address)
                return
            time.sleep(0.02)
        raise AssertionError(f"{' '.join(self.argv)} does not accept connections")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if sig == signal.SIGKILL:
                # A stopped process only dies once continued.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.proc.wait()
        if isinstance(self.address, str) and sig == signal.SIGKILL:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


@contextlib.contextmanager
def qemu_nbd(image: Path, fmt: str = "raw", *, export: str = "disk", writable: bool = False,
             unix: Path | None = None, tls: Path | None = None) -> Iterator[NbdServer]:
    """``qemu-nbd --persistent`` exporting ``image`` read-only unless ``writable``; with
    ``tls`` (a :func:`make_tls_certificates` directory) TLS only, and an ``nbds`` URL."""
    argv = [QEMU_NBD, "--persistent", "-f", fmt, "-x", export, "--cache=writeback"]
    if tls is not None:
        argv += ["--object", f"tls-creds-x509,id=tls0,dir={tls},endpoint=server",
                 "--tls-creds", "tls0"]
    if not writable:
        argv.append("--read-only")
    if unix is not None:
        argv += ["-k", str(unix)]
        scheme = "nbds+unix" if tls else "nbd+unix"
        server = NbdServer([*argv, str(image)], f"{scheme}:///{export}?socket={unix}",
                           str(unix))
    else:
        port = free_port()
        argv += ["-b", "127.0.0.1", "-p", str(port)]
        scheme = "nbds" if tls else "nbd"
        server = NbdServer([*argv, str(image)], f"{scheme}://127.0.0.1:{port}/{export}",
                           ("127.0.0.1", port))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def nbdkit(plugin: str, *args: str, export: str = "",
           filters: tuple[str, ...] = ()) -> Iterator[NbdServer]:
    """``nbdkit --foreground`` with ``filters``, ``plugin`` and the arguments of both, on a
    free port."""
    assert NBDKIT is not None
    port = free_port()
    argv = [NBDKIT, "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
            *(f"--filter={f}" for f in filters), plugin, *args]
    server = NbdServer(argv, f"nbd://127.0.0.1:{port}/{export}", ("127.0.0.1", port))
    server.start()
    try:
        yield server
    finally:
        server.kill()


def make_tls_certificates(directory: Path, *, names: str = "IP:127.0.0.1,DNS:localhost"
                          ) -> Path:
    """A throw-away CA, a server certificate for ``names`` and a client certificate, laid
    out as QEMU's ``tls-creds-x509`` (and libnbd's ``tls-certificates``) expect:
    ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem``,
    ``client-key.pem``."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server-key.pem", "-out", "server.csr")
    (directory / "ext.cnf").write_text(f"subjectAltName={names}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server-cert.pem")
    # The client's, which QEMU asks for by default (tls-creds-x509 verify-peer=on).
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client",
            "-keyout", "client-key.pem", "-out", "client.csr")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-out", "client-cert.pem")
    return directory
