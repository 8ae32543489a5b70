"""AWS Signature Version 4 for S3 requests, as an ``Authorization`` header. Pure: no I/O, no
clock (the caller passes the time), so that it is checked against AWS's published examples.

The steps are those of AWS's "Authenticating Requests: Using the Authorization Header (AWS
Signature Version 4)": a *canonical request* (method, URI, query, the signed headers in lower
case and sorted, the payload's SHA-256), a *string to sign* naming the algorithm, the time, the
*scope* (``DATE/REGION/s3/aws4_request``) and the canonical request's hash, and a signature
made with a key derived from the secret by four HMACs over the scope. S3 differs from the other
services in one point: the URI's path is encoded once, not twice.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import urllib.parse
from collections.abc import Iterable

__all__ = [
    "ALGORITHM",
    "EMPTY_SHA256",
    "amz_date",
    "canonical_request",
    "sign_headers",
    "signing_key",
    "string_to_sign",
]

ALGORITHM = "AWS4-HMAC-SHA256"
#: The SHA-256 of an empty payload (HEAD, GET): ``x-amz-content-sha256`` of a read.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: Headers never signed: a proxy may rewrite them, and botocore leaves them out too.
_UNSIGNED = frozenset({"authorization", "user-agent", "expect", "x-amzn-trace-id"})


def amz_date(now: datetime.datetime) -> str:
    """``20130524T000000Z``: the form of ``x-amz-date`` (``now`` must be aware, any zone)."""
    return now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def _canonical_query(query: str) -> str:
    """The query with its parameters encoded the AWS way and sorted (by name, then value)."""
    if not query:
        return ""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    encoded = sorted((urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
                     for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def canonical_request(method: str, target: str, headers: Iterable[tuple[str, str]],
                      payload_sha256: str) -> tuple[str, str]:
    """The canonical request of ``method target`` (the path as sent, already URI-encoded,
    with its query) and the names of the signed headers (``host;range;x-amz-date``)."""
    path, _, query = target.partition("?")
    signed: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in _UNSIGNED:
            continue
        # Repeated headers join with commas; inner runs of spaces fold to one (AWS's trimall).
        value = " ".join(value.split())
        signed[key] = f"{signed[key]},{value}" if key in signed else value
    names = sorted(signed)
    lines = [method, path or "/", _canonical_query(query),
             *(f"{name}:{signed[name]}" for name in names), "",
             ";".join(names), payload_sha256]
    return "\n".join(lines), ";".join(names)


def _scope(date: str, region: str, service: str) -> str:
    return f"{date[:8]}/{region}/{service}/aws4_request"


def string_to_sign(canonical: str, date: str, region: str, service: str = "s3") -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return "\n".join([ALGORITHM, date, _scope(date, region, service), digest])


def signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    """The key derived from the secret for one day, region and service."""
    key = f"AWS4{secret_key}".encode()
    for part in (date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign_headers(method: str, target: str, headers: Iterable[tuple[str, str]], *,
                 access_key: str, secret_key: str, region: str,
                 now: datetime.datetime, session_token: str | None = None,
                 payload_sha256: str = EMPTY_SHA256,
                 service: str = "s3") -> list[tuple[str, str]]:
    """``headers`` (``Host`` among them) with what a signed request adds: ``x-amz-date``,
    ``x-amz-content-sha256``, ``x-amz-security-token`` (temporary credentials) and the
    ``Authorization`` header. ``target`` is the request target as sent (path and query)."""
    date = amz_date(now)
    out = [*headers, ("x-amz-date", date), ("x-amz-content-sha256", payload_sha256)]
    if session_token:
        out.append(("x-amz-security-token", session_token))
    canonical, signed_names = canonical_request(method, target, out, payload_sha256)
    signature = hmac.new(signing_key(secret_key, date, region, service),
                         string_to_sign(canonical, date, region, service).encode(),
                         hashlib.sha256).hexdigest()
    out.append(("Authorization",
                f"{ALGORITHM} Credential={access_key}/{_scope(date, region, service)},"
                f"SignedHeaders={signed_names},Signature={signature}"))
    return out
