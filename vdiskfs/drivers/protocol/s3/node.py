"""Protocol driver ``s3``: an object of an S3-compatible store, read-only, by ``s3://BUCKET/KEY``.

An S3 object is an HTTP resource whose every request is signed, so :class:`S3Node` is an
:class:`~vdiskfs.drivers.protocol.http.HttpNode` that changes only what differs: requests are
signed with Signature V4 (:mod:`.sigv4`) by the pool's signing hook, at each attempt; redirects
are not followed (a signature names its host: S3 redirects only to say that the bucket lives
elsewhere, which is reported); a refusal is read from S3's error document and named by its
code. Everything else is the http node's: the keep-alive pool and its retries, TLS and
``--ca-file``, ``HEAD`` for the size with the ETag pinned (``If-Match`` on every ranged
``GET``), the checks of each ``206``, and the read cache that the registry puts above it.

Endpoint, region and credentials come from the AWS environment and config files
(:mod:`.config`). The node's label is the ``s3://`` URL, which holds no credential; the
secret key and session token appear only in the signing, and the access key id is shown by its
last four characters.
"""

from __future__ import annotations

import datetime
import errno
import logging
import re
import urllib.parse
from typing import Any, ClassVar

from vdiskfs.block.context import OpenOptions
from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import register_protocol
from vdiskfs.drivers.protocol.http.node import HttpNode, opened
from vdiskfs.drivers.protocol.http.pool import HttpError, Response, Signer
from vdiskfs.drivers.protocol.s3 import sigv4
from vdiskfs.drivers.protocol.s3.config import S3Config, S3Location, parse_s3_url
from vdiskfs.errors import UnsupportedError

__all__ = ["S3Error", "S3Node", "open_s3"]

log = logging.getLogger(__name__)

# A name recorded in an image opened by s3:// URL (a backing file, a data file) resolves
# against that URL with urllib.parse.urljoin, as for https: it joins only the schemes that
# urllib knows to be hierarchical, and s3://BUCKET/KEY is one.
for _scheme_list in (urllib.parse.uses_relative, urllib.parse.uses_netloc):
    if "s3" not in _scheme_list:
        _scheme_list.append("s3")

#: S3's error code in its error document (``<Error><Code>NoSuchKey</Code>...``): a regular
#: expression rather than an XML parser, for the few fields read from an untrusted answer.
_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{1,300})</Message>")


class S3Error(HttpError):
    """S3 refused a request; the message names the bucket, the key and S3's error code."""


class S3Node(HttpNode):
    """An S3 object, read-only."""

    driver = "s3"
    follow_redirects: ClassVar[bool] = False

    def __init__(self, url: str, config: S3Config, *, ca_file: str | None = None,
                 verify_tls: bool = True, **options: Any) -> None:
        self.location: S3Location = parse_s3_url(url)
        self.config = config
        super().__init__(config.request_url(self.location), ca_file=ca_file,
                         verify_tls=verify_tls, label=self.location.url, **options)

    def authorization(self, parts: urllib.parse.SplitResult) -> str | None:
        # No Basic credentials (not from a netrc file either): requests are signed instead.
        return None

    def signer(self) -> Signer | None:
        credentials = self.config.credentials
        if credentials is None:
            return None  # a public object: unsigned requests
        region = self.config.region

        def sign(method: str, target: str,
                 headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
            return sigv4.sign_headers(
                method, target, headers, access_key=credentials.access_key,
                secret_key=credentials.secret_key, session_token=credentials.session_token,
                region=region, now=datetime.datetime.now(datetime.UTC))

        return sign

    async def refusal(self, response: Response, method: str,
                      offset: int | None = None) -> HttpError:
        body = response.body
        if method == "HEAD":
            # A HEAD answer has no body: a ranged GET fetches the error document that says
            # which of bucket and key is missing, or why access is denied.
            origin = self.origin
            try:
                body = (await origin.pool.request(
                    "GET", origin.target, origin.headers(("Range", "bytes=0-0")),
                    body_limit=64 * 1024)).body
            except HttpError:
                body = b""
        return self._s3_error(response, method, body, offset)

    def _s3_error(self, response: Response, method: str, body: bytes | bytearray,
                  offset: int | None) -> S3Error:
        status = response.status
        match = _CODE.search(body)
        code = match.group(1).decode() if match else None
        location = self.location
        bucket, key = location.bucket, location.key
        credentials = self.config.credentials
        where = f"{self.config.endpoint or 'AWS'} ({self.config.region})"
        keys = (f"access key id {credentials.shown_key()} from {credentials.source}"
                if credentials is not None else
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE")
        said = f"S3 error {code}, HTTP {status}" if code else f"HTTP {status}"
        number = errno.EIO
        if code == "NoSuchBucket":
            text, number = f"no bucket {bucket!r} on {where}", errno.ENOENT
        elif code == "NoSuchKey" or status == 404:
            text, number = f"no object {key!r} in bucket {bucket!r}", errno.ENOENT
        elif code == "InvalidAccessKeyId":
            text, number = f"the server knows no such access key ({keys})", errno.EACCES
        elif code == "SignatureDoesNotMatch":
            text, number = (f"the secret key does not match the access key ({keys})",
                            errno.EACCES)
        elif code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
            text, number = (f"the session token (AWS_SESSION_TOKEN, aws_session_token) is "
                            f"expired or invalid ({keys})", errno.EACCES)
        elif code == "RequestTimeTooSkewed":
            text, number = ("this machine's clock differs from the server's by more than 15 "
                            "minutes: signatures carry the time", errno.EACCES)
        elif code in ("PermanentRedirect", "AuthorizationHeaderMalformed") or status == 301:
            region = response.headers.get("x-amz-bucket-region")
            hint = f" (it is in {region}: set AWS_REGION={region})" if region else \
                " (set AWS_REGION, or AWS_ENDPOINT_URL)"
            text = f"bucket {bucket!r} is not served at {where}{hint}"
        elif status in (401, 403):
            text, number = f"access to object {key!r} in bucket {bucket!r} denied ({keys})", \
                errno.EACCES
        else:
            message = _MESSAGE.search(body)
            text = f"{method} refused" + (f": {message.group(1).decode(errors='replace')}"
                                          if message else "")
        return S3Error(f"{text} [{said}]", path=self.label, offset=offset, errno=number)

    def info(self) -> dict[str, Any]:
        credentials = self.config.credentials
        return {"filename": self.label, "endpoint": self.config.endpoint or "AWS",
                "region": self.config.region,
                "access_key": credentials.shown_key() if credentials else None}


@register_protocol("s3", read_only=True)
async def open_s3(url: str, options: OpenOptions) -> BlockNode:
    """The open protocol node of ``url`` (read-only: writing is refused with EROFS)."""
    if not options.read_only:
        raise UnsupportedError("s3 objects are read-only (mount without --rw)", path=url,
                               errno=errno.EROFS)
    return await opened(S3Node(url, S3Config.from_environment(), ca_file=options.ca_file,
                               verify_tls=options.verify_tls), options)
