"""Where an ``s3://`` URL goes and with which keys: the AWS environment and config files, read
as the AWS CLI reads them (no boto), and the URL itself.

Precedence, as the AWS CLI and SDKs:

- **credentials**: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (with
  ``AWS_SESSION_TOKEN``), else the profile's ``aws_access_key_id``/``aws_secret_access_key``/
  ``aws_session_token`` in the credentials file (``AWS_SHARED_CREDENTIALS_FILE``, else
  ``~/.aws/credentials``), else in the config file (``AWS_CONFIG_FILE``, else
  ``~/.aws/config``); none at all: requests go unsigned (a public bucket);
- **profile**: ``AWS_PROFILE``, else ``AWS_DEFAULT_PROFILE``, else ``default``; a profile named
  by the environment must exist;
- **region**: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the profile's ``region``, else
  ``us-east-1``;
- **endpoint**: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else the profile's
  ``endpoint_url``, else AWS itself.

Addressing: an endpoint that is not AWS's (radosgw, MinIO...) gets *path-style* requests
(``ENDPOINT/BUCKET/KEY``), which every S3-compatible store serves; AWS gets *virtual-host*
requests (``https://BUCKET.s3.REGION.amazonaws.com/KEY``), which it requires of new buckets,
except for a bucket whose name has dots (its host name would not match AWS's wildcard TLS
certificate), which stays path-style.

The secret key and session token live only in :class:`Credentials` (left out of its ``repr``);
what may be shown is :meth:`Credentials.shown_key`, the access key id's last four characters.
"""

from __future__ import annotations

import configparser
import errno
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from vdiskfs.block.registry import redact_url
from vdiskfs.errors import VdiskError

__all__ = ["Credentials", "S3Config", "S3Location", "parse_s3_url"]

DEFAULT_REGION = "us-east-1"
#: A bucket name that can be a DNS label of a virtual host (no dots: see the module's text).
_VIRTUAL_HOST_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


class S3ConfigError(VdiskError):
    """The AWS configuration (environment, config or credentials file) cannot be used."""

    errno = errno.EINVAL


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: Where they were found, for messages: ``the environment``, ``profile 'x' in FILE``.
    source: str = "the environment"

    def shown_key(self) -> str:
        """The access key id as it may be shown: its last four characters (as
        ``aws configure list`` shows it)."""
        return "****" + self.access_key[-4:] if len(self.access_key) > 8 else "****"


@dataclass(frozen=True)
class S3Location:
    """An ``s3://BUCKET/KEY`` URL, parsed (the key percent-decoded, as any URL's path)."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{urllib.parse.quote(self.key, safe='/')}"


def parse_s3_url(url: str) -> S3Location:
    """``s3://BUCKET/KEY`` -> bucket and key; anything else is refused naming what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise S3ConfigError("not an s3:// URL", path=url)
    if "@" in parts.netloc or ":" in parts.netloc:
        raise S3ConfigError("an s3:// URL names a bucket, with no credentials or port in it "
                            "(credentials come from the AWS environment or config files, the "
                            "server from AWS_ENDPOINT_URL)", path=redact_url(url))
    if not parts.netloc:
        raise S3ConfigError("no bucket in the URL (s3://BUCKET/KEY)", path=url)
    if parts.query or parts.fragment:
        raise S3ConfigError("an s3:// URL takes no query or fragment (write ? as %3F and # as "
                            "%23 in a key)", path=url)
    key = urllib.parse.unquote(parts.path[1:])
    if not key or key.endswith("/"):
        raise S3ConfigError("no object key in the URL (s3://BUCKET/KEY)", path=url)
    return S3Location(parts.netloc, key)


@dataclass(frozen=True)
class S3Config:
    """The endpoint, region and credentials that requests use."""

    #: ``scheme://host[:port]`` of an S3-compatible server; None: AWS.
    endpoint: str | None
    region: str
    credentials: Credentials | None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> S3Config:
        env = os.environ if environ is None else environ
        profile_name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
        profile = _Profile.load(env, profile_name or "default", required=bool(profile_name))
        credentials = _env_credentials(env) or profile.credentials()
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") \
            or profile.get("region") or DEFAULT_REGION
        for source in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if env.get(source):
                endpoint: str | None = _endpoint(env[source], source)
                break
        else:
            value = profile.get("endpoint_url")
            endpoint = _endpoint(value, profile.where("endpoint_url")) if value else None
        return cls(endpoint, region, credentials)

    def request_url(self, location: S3Location) -> str:
        """The ``http(s)://`` URL of the object: path-style on an endpoint that is not AWS's,
        virtual-host style on AWS (see the module's text)."""
        key = urllib.parse.quote(location.key, safe="/~")
        endpoint = self.endpoint
        aws = endpoint is None or (urllib.parse.urlsplit(endpoint).hostname or "").endswith(
            ".amazonaws.com")
        if endpoint is None:
            endpoint = f"https://s3.{self.region}.amazonaws.com"
        if aws and _VIRTUAL_HOST_BUCKET.fullmatch(location.bucket):
            parts = urllib.parse.urlsplit(endpoint)
            return f"{parts.scheme}://{location.bucket}.{parts.netloc}/{key}"
        return f"{endpoint}/{urllib.parse.quote(location.bucket, safe='')}/{key}"


def _endpoint(value: str, source: str) -> str:
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username \
            or parts.path.strip("/") or parts.query:
        raise S3ConfigError(f"{value!r} is not an endpoint URL (http(s)://HOST[:PORT], with no "
                            "path or credentials)", path=source)
    return f"{parts.scheme}://{parts.netloc}"


def _env_credentials(env: Mapping[str, str]) -> Credentials | None:
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not access and not secret:
        return None
    if not (access and secret):
        missing = "AWS_SECRET_ACCESS_KEY" if access else "AWS_ACCESS_KEY_ID"
        raise S3ConfigError(f"{missing} is not set, while "
                            f"{'AWS_ACCESS_KEY_ID' if access else 'AWS_SECRET_ACCESS_KEY'} is",
                            path="environment")
    return Credentials(access, secret, env.get("AWS_SESSION_TOKEN") or None)


@dataclass
class _Profile:
    """One profile's sections: of the credentials file (``[NAME]``) and of the config file
    (``[profile NAME]``, or ``[default]``)."""

    name: str
    sections: list[tuple[str, Mapping[str, str]]]

    @classmethod
    def load(cls, env: Mapping[str, str], name: str, *, required: bool) -> _Profile:
        home = env.get("HOME") or os.path.expanduser("~")
        credentials_file = env.get("AWS_SHARED_CREDENTIALS_FILE") \
            or os.path.join(home, ".aws", "credentials")
        config_file = env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
        sections: list[tuple[str, Mapping[str, str]]] = []
        for path, section in ((credentials_file, name),
                              (config_file, name if name == "default" else f"profile {name}")):
            parser = _read(os.path.expanduser(path))
            if parser is not None and parser.has_section(section):
                sections.append((f"{path} [{section}]", parser[section]))
        if required and not sections:
            raise S3ConfigError(f"profile {name!r} (AWS_PROFILE) is in neither "
                                f"{credentials_file} nor {config_file}", path="environment")
        return cls(name, sections)

    def get(self, key: str) -> str | None:
        for _where, section in self.sections:
            value = section.get(key)
            if value:
                return value.strip()
        return None

    def where(self, key: str) -> str:
        for where, section in self.sections:
            if section.get(key):
                return where
        return self.name

    def credentials(self) -> Credentials | None:
        for where, section in self.sections:
            access = (section.get("aws_access_key_id") or "").strip()
            secret = (section.get("aws_secret_access_key") or "").strip()
            if not access and not secret:
                continue
            if not (access and secret):
                missing = "aws_secret_access_key" if access else "aws_access_key_id"
                raise S3ConfigError(f"{missing} is missing beside "
                                    f"{'aws_access_key_id' if access else 'aws_secret_access_key'}",
                                    path=where, field=missing)
            token = (section.get("aws_session_token") or "").strip() or None
            return Credentials(access, secret, token, source=f"profile {self.name!r} in {where}")
        return None


def _read(path: str) -> configparser.ConfigParser | None:
    """The INI file at ``path``; None when there is none. A file that cannot be parsed is an
    error naming it and the line (never its text: it may hold keys)."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise S3ConfigError(f"cannot read: {exc.strerror}", path=path,
                            errno=exc.errno or errno.EIO) from None
    except UnicodeDecodeError:
        raise S3ConfigError("not UTF-8 text", path=path) from None
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        raise S3ConfigError(f"cannot be parsed ({type(exc).__name__}"
                            f"{f' at line {line}' if line else ''})", path=path) from None
    return parser
