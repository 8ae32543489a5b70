"""Web servers for the http protocol tests: nginx over HTTP and HTTPS, and small misbehaving ones.

:func:`start_nginx` runs the Debian ``nginx`` binary (never its system service) as a child
process on 127.0.0.1 with free ports and a config in a temporary directory: ``daemon off``,
``master_process off``, pid, logs and temp paths in that directory. HTTPS uses a server
certificate signed by a CA made here with ``openssl``, which tests pass as ``ca_file``.
``/private/`` asks for Basic authentication (:data:`USER`, :data:`PASSWORD`).
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "reader"
PASSWORD = "s3cret-Pa55"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """``(ca.pem, server.pem, server.key)``: a CA and a certificate for 127.0.0.1/localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=vdiskfs test CA", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=directory)
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


@dataclass
class Nginx:
    root: Path
    http_port: int
    https_port: int
    ca_file: Path
    directory: Path

    def url(self, name: str, *, tls: bool = False, credentials: str = "") -> str:
        scheme, port = ("https", self.https_port) if tls else ("http", self.http_port)
        return f"{scheme}://{credentials}127.0.0.1:{port}/{name}"

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in (self.directory / "access.log", self.directory / "error.log")
                       if p.exists())


def _config(d: Path, root: Path, http_port: int, https_port: int, cert: Path, key: Path) -> str:
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp-body;
    proxy_temp_path {d}/tmp-proxy;
    fastcgi_temp_path {d}/tmp-fastcgi;
    uwsgi_temp_path {d}/tmp-uwsgi;
    scgi_temp_path {d}/tmp-scgi;
    default_type application/octet-stream;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{http_port};
        root {root};
        location /private/ {{
            auth_basic "vdiskfs test";
            auth_basic_user_file {d}/htpasswd;
        }}
        location /redirect/ {{
            rewrite ^/redirect/(.*)$ /$1 redirect;
        }}
    }}
    server {{
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
    }}
}}
"""


@contextlib.contextmanager
def start_nginx(directory: Path) -> Iterator[Nginx]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    root = directory / "root"
    (root / "private").mkdir(parents=True)
    ca_file, cert, key = make_ca(directory / "tls")
    hashed = subprocess.run(["openssl", "passwd", "-apr1", PASSWORD], check=True,
                            capture_output=True, text=True).stdout.strip()
    (directory / "htpasswd").write_text(f"{USER}:{hashed}\n")
    http_port, https_port = free_port(), free_port()
    conf = directory / "nginx.conf"
    conf.write_text(_config(directory, root, http_port, https_port, cert, key))
    proc = subprocess.Popen([nginx, "-p", str(directory), "-c", str(conf), "-e",
                             str(directory / "error.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                for port in (http_port, https_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {proc.stderr.read()!r}"  # type: ignore[union-attr]
                                       ) from None
                time.sleep(0.05)
        yield Nginx(root, http_port, https_port, ca_file, directory)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.data``: HEAD as configured, every GET with 200 and the whole body."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def _head(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.data)))
        if self.server.accept_ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._head()

    def do_GET(self) -> None:
        self._head()
        self.wfile.write(self.server.data)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    data: bytes
    accept_ranges: bool
    daemon_threads = True


@contextlib.contextmanager
def ignoring_range_server(data: bytes, *, accept_ranges: bool) -> Iterator[str]:
    """A server that answers every GET with 200 and the whole body; its base URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.data = data
    server.accept_ranges = accept_ranges
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _FlakyHandler(_Handler):
    """Honours ``Range``, after ``server.delay`` seconds (a far server), but breaks the
    connection on the first ``server.failures`` GETs: before answering (``server.mode ==
    "drop"``) or halfway through the body ("truncate")."""

    server: _FlakyServer

    def do_GET(self) -> None:
        stats = self.server.stats
        with self.server.lock:
            stats["in_flight"] = stats.get("in_flight", 0) + 1
            stats["most_in_flight"] = max(stats.get("most_in_flight", 0), stats["in_flight"])
        try:
            self._answer()
        finally:
            with self.server.lock:
                stats["in_flight"] -= 1

    def _answer(self) -> None:
        time.sleep(self.server.delay)
        data = self.server.data
        first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last), len(data) - 1)
        part = data[start:end + 1]
        with self.server.lock:
            fail = self.server.failures > 0
            self.server.failures -= fail
        if fail and self.server.mode == "drop":
            self.close_connection = True
            return
        self.send_response(206)
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if fail:
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)


class _FlakyServer(_Server):
    stats: dict[str, int]
    delay: float
    failures: int
    mode: str
    lock: threading.Lock


@contextlib.contextmanager
def flaky_server(data: bytes, *, failures: int = 0, mode: str = "drop",
                 delay: float = 0.0, stats: dict[str, int] | None = None) -> Iterator[str]:
    """A ranged server that answers GETs after ``delay`` seconds, and whose first
    ``failures`` GETs lose the connection; its base URL. ``stats`` gets ``most_in_flight``:
    the most GETs it answered at once."""
    server = _FlakyServer(("127.0.0.1", 0), _FlakyHandler)
    server.data = data
    server.accept_ranges = True
    server.failures = failures
    server.mode = mode
    server.delay = delay
    server.stats = stats if stats is not None else {}
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
