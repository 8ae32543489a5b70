"""Signature V4 (vdiskfs.drivers.protocol.s3.sigv4) against the examples that AWS publishes in
"Authenticating Requests: Using the Authorization Header (AWS Signature Version 4)" for S3:
the same keys, time and requests give the same canonical request, string to sign and
signature."""

from __future__ import annotations

import datetime
import hashlib

from vdiskfs.drivers.protocol.s3.sigv4 import (
    EMPTY_SHA256,
    canonical_request,
    sign_headers,
    string_to_sign,
)

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
NOW = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
HOST = ("Host", "examplebucket.s3.amazonaws.com")


def _authorization(headers: list[tuple[str, str]]) -> str:
    return dict(headers)["Authorization"]


def test_get_object_example() -> None:
    """"Example: GET Object": the first 10 bytes of test.txt."""
    headers = sign_headers("GET", "/test.txt", [HOST, ("Range", "bytes=0-9")],
                           access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                           now=NOW)
    canonical, signed = canonical_request("GET", "/test.txt", headers, EMPTY_SHA256)
    assert canonical == "\n".join([
        "GET", "/test.txt", "",
        "host:examplebucket.s3.amazonaws.com",
        "range:bytes=0-9",
        f"x-amz-content-sha256:{EMPTY_SHA256}",
        "x-amz-date:20130524T000000Z",
        "",
        "host;range;x-amz-content-sha256;x-amz-date",
        EMPTY_SHA256,
    ])
    assert string_to_sign(canonical, "20130524T000000Z", "us-east-1") == "\n".join([
        "AWS4-HMAC-SHA256", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972",
    ])
    assert _authorization(headers) == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    assert signed == "host;range;x-amz-content-sha256;x-amz-date"


def test_put_object_example() -> None:
    """"Example: PUT Object": a payload, a ``$`` encoded in the path, a Date header."""
    body = b"Welcome to Amazon S3."
    headers = sign_headers(
        "PUT", "/test%24file.text",
        [HOST, ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
         ("x-amz-storage-class", "REDUCED_REDUNDANCY")],
        access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1", now=NOW,
        payload_sha256=hashlib.sha256(body).hexdigest())
    assert dict(headers)["x-amz-content-sha256"] == \
        "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    assert _authorization(headers).endswith(
        "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"
        "Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")


def test_get_bucket_list_objects_example() -> None:
    """"Example: GET Bucket (List Objects)": a query, sorted by name."""
    headers = sign_headers("GET", "/?max-keys=2&prefix=J", [HOST], access_key=ACCESS_KEY,
                           secret_key=SECRET_KEY, region="us-east-1", now=NOW)
    assert _authorization(headers).endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")


def test_session_token_and_unsigned_headers() -> None:
    headers = sign_headers("HEAD", "/b/k", [HOST, ("User-Agent", "vdiskfs")],
                           access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="eu-west-1",
                           now=NOW, session_token="TOKEN")
    assert ("x-amz-security-token", "TOKEN") in headers
    authorization = _authorization(headers)
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token," \
        in authorization
    assert "/eu-west-1/s3/aws4_request" in authorization
    assert SECRET_KEY not in str(headers)
