"""A radosgw as an S3 store for the ``s3`` tests: a small signed client (Signature V4 from
vdiskfs's own :mod:`~vdiskfs.drivers.protocol.s3.sigv4`, over :mod:`http.client`) that creates
buckets and uploads objects -- no awscli or boto -- and the environment that points vdiskfs at
the store."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from vdiskfs.drivers.protocol.s3 import sigv4

__all__ = ["S3Store"]


@dataclass(frozen=True)
class S3Store:
    """An S3 endpoint (path-style) and one user's keys; :attr:`bucket` exists."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def env(self, **overrides: str) -> dict[str, str]:
        """AWS environment variables that point vdiskfs at this store."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, **overrides}

    def url(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{key}"

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One signed request (``path`` is ``/BUCKET[/KEY]``, unencoded); status and body."""
        parts = urllib.parse.urlsplit(self.endpoint)
        target = urllib.parse.quote(path, safe="/~")
        headers = sigv4.sign_headers(
            method, target, [("Host", parts.netloc), ("Content-Length", str(len(body)))],
            access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            now=datetime.datetime.now(datetime.UTC),
            payload_sha256=hashlib.sha256(body).hexdigest())
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def create_bucket(self, bucket: str) -> None:
        status, body = self.request("PUT", f"/{bucket}")
        if status != 200:
            raise RuntimeError(f"creating bucket {bucket}: HTTP {status} {body[:300]!r}")

    def put(self, key: str, data: bytes | Path, bucket: str | None = None) -> str:
        """Upload ``data`` (bytes, or a file's) as ``key``; its ``s3://`` URL."""
        body = data.read_bytes() if isinstance(data, Path) else data
        status, answer = self.request("PUT", f"/{bucket or self.bucket}/{key}", body)
        if status != 200:
            raise RuntimeError(f"uploading {key}: HTTP {status} {answer[:300]!r}")
        return self.url(key, bucket)

    def put_tree(self, prefix: str, directory: Path) -> None:
        """Upload every file under ``directory`` as ``prefix/RELATIVE/PATH``."""
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                self.put(f"{prefix}/{path.relative_to(directory)}", path)
