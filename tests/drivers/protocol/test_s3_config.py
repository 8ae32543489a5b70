"""Where an s3:// URL goes and with which keys (vdiskfs.drivers.protocol.s3.config): the URL,
the AWS environment variables and config files in the AWS CLI's order, the addressing style,
and bad input refused naming the file, variable or field -- without a cluster."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from vdiskfs.drivers.protocol.s3.config import S3Config, S3ConfigError, parse_s3_url
from vdiskfs.fs.daemon import image_stem

SECRET = "s3cr3t/KEY+value"


def _env(tmp_path: Path, **env: str) -> dict[str, str]:
    """An environment with no AWS files but those the test writes."""
    return {"HOME": str(tmp_path / "home"), **env}


def test_parse_s3_url() -> None:
    location = parse_s3_url("s3://bucket/images/a%20b.qcow2")
    assert (location.bucket, location.key) == ("bucket", "images/a b.qcow2")
    assert location.url == "s3://bucket/images/a%20b.qcow2"
    for url, message in [
        ("s3://bucket", "no object key"),
        ("s3://bucket/dir/", "no object key"),
        ("s3:///key", "no bucket"),
        ("s3://bucket/k?versionId=1", "no query or fragment"),
        ("s3://AKIA:secret@bucket/k", "no credentials or port"),
        ("s3://bucket:9000/k", "no credentials or port"),
    ]:
        with pytest.raises(S3ConfigError, match=message) as info:
            parse_s3_url(url)
        assert "secret" not in str(info.value)
        assert info.value.errno == errno.EINVAL


def test_image_stem_of_s3_urls() -> None:
    assert image_stem("s3://bucket/vms/debian-12.qcow2") == "debian-12"
    assert image_stem("s3://bucket/disk") == "disk"


def test_environment_variables(tmp_path: Path) -> None:
    config = S3Config.from_environment(_env(
        tmp_path, AWS_ACCESS_KEY_ID="AKIAEXAMPLEKEY1234", AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_SESSION_TOKEN="token", AWS_DEFAULT_REGION="eu-west-3",
        AWS_ENDPOINT_URL="http://rgw.local:7480/", AWS_ENDPOINT_URL_S3="https://s3.local"))
    assert config.endpoint == "https://s3.local"  # the S3-specific variable wins
    assert config.region == "eu-west-3"
    credentials = config.credentials
    assert credentials is not None
    assert (credentials.access_key, credentials.secret_key, credentials.session_token) == \
        ("AKIAEXAMPLEKEY1234", SECRET, "token")
    assert credentials.shown_key() == "****1234"
    assert SECRET not in repr(config) and "token" not in repr(credentials)
    assert S3Config.from_environment(_env(tmp_path)) == S3Config(None, "us-east-1", None)


def test_profiles(tmp_path: Path) -> None:
    aws = tmp_path / "home" / ".aws"
    aws.mkdir(parents=True)
    (aws / "credentials").write_text(f"[default]\naws_access_key_id = DEFAULTKEY0000\n"
                                     f"aws_secret_access_key = {SECRET}\n\n[other]\n"
                                     f"aws_access_key_id = OTHERKEY1111\n"
                                     f"aws_secret_access_key = {SECRET}\n")
    (aws / "config").write_text("[default]\nregion = eu-central-1\n\n[profile other]\n"
                                "region = ap-south-1\nendpoint_url = http://minio:9000\n\n"
                                "[profile keys-in-config]\naws_access_key_id = CONFIGKEY2222\n"
                                f"aws_secret_access_key = {SECRET}\n")
    default = S3Config.from_environment(_env(tmp_path))
    assert default.region == "eu-central-1" and default.endpoint is None
    assert default.credentials is not None
    assert default.credentials.access_key == "DEFAULTKEY0000"
    assert default.credentials.source == f"profile 'default' in {aws}/credentials [default]"
    other = S3Config.from_environment(_env(tmp_path, AWS_PROFILE="other"))
    assert (other.region, other.endpoint) == ("ap-south-1", "http://minio:9000")
    assert other.credentials is not None and other.credentials.access_key == "OTHERKEY1111"
    in_config = S3Config.from_environment(_env(tmp_path, AWS_PROFILE="keys-in-config"))
    assert in_config.credentials is not None
    assert in_config.credentials.access_key == "CONFIGKEY2222"
    # Keys in the environment win over the profile's; the region variable over its region.
    env = S3Config.from_environment(_env(tmp_path, AWS_PROFILE="other", AWS_REGION="us-west-2",
                                         AWS_ACCESS_KEY_ID="ENVKEY3333",
                                         AWS_SECRET_ACCESS_KEY=SECRET))
    assert env.credentials is not None and env.credentials.access_key == "ENVKEY3333"
    assert (env.region, env.endpoint) == ("us-west-2", "http://minio:9000")
    # Files named by the environment instead of ~/.aws.
    (tmp_path / "creds").write_text(f"[x]\naws_access_key_id = FILEKEY4444\n"
                                    f"aws_secret_access_key = {SECRET}\n")
    named = S3Config.from_environment(_env(
        tmp_path, AWS_PROFILE="x", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "creds"),
        AWS_CONFIG_FILE=str(tmp_path / "none")))
    assert named.credentials is not None and named.credentials.access_key == "FILEKEY4444"


def test_bad_configuration_named(tmp_path: Path) -> None:
    with pytest.raises(S3ConfigError, match=r"profile 'nope' \(AWS_PROFILE\) is in neither"):
        S3Config.from_environment(_env(tmp_path, AWS_PROFILE="nope"))
    with pytest.raises(S3ConfigError, match=r"^environment: AWS_SECRET_ACCESS_KEY is not set"):
        S3Config.from_environment(_env(tmp_path, AWS_ACCESS_KEY_ID="AKIA"))
    with pytest.raises(S3ConfigError, match=r"^AWS_ENDPOINT_URL: 'rgw:7480' is not an endpoint"):
        S3Config.from_environment(_env(tmp_path, AWS_ENDPOINT_URL="rgw:7480"))

    broken = tmp_path / "broken"
    broken.write_text(f"aws_secret_access_key = {SECRET}\n[default]\n")
    with pytest.raises(S3ConfigError, match=rf"^{broken}: cannot be parsed "
                       r"\(MissingSectionHeaderError at line 1\)") as info:
        S3Config.from_environment(_env(tmp_path, AWS_SHARED_CREDENTIALS_FILE=str(broken)))
    assert SECRET not in str(info.value)

    half = tmp_path / "half"
    half.write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    with pytest.raises(S3ConfigError, match=rf"^{half} \[default\]: field aws_access_key_id: "
                       "aws_access_key_id is missing beside aws_secret_access_key") as info:
        S3Config.from_environment(_env(tmp_path, AWS_SHARED_CREDENTIALS_FILE=str(half)))
    assert SECRET not in str(info.value)


def test_addressing_style() -> None:
    rgw = S3Config("http://127.0.0.1:7480", "us-east-1", None)
    location = parse_s3_url("s3://my-bucket/dir/a b~.qcow2")
    assert rgw.request_url(location) == "http://127.0.0.1:7480/my-bucket/dir/a%20b~.qcow2"
    aws = S3Config(None, "eu-west-1", None)
    assert aws.request_url(location) == \
        "https://my-bucket.s3.eu-west-1.amazonaws.com/dir/a%20b~.qcow2"
    # Dots would not match AWS's wildcard certificate: path-style.
    assert aws.request_url(parse_s3_url("s3://my.bucket/k")) == \
        "https://s3.eu-west-1.amazonaws.com/my.bucket/k"
    fips = S3Config("https://s3-fips.us-east-2.amazonaws.com", "us-east-2", None)
    assert fips.request_url(location) == \
        "https://my-bucket.s3-fips.us-east-2.amazonaws.com/dir/a%20b~.qcow2"


@pytest.mark.parametrize(("status", "code", "headers", "expected", "err"), [
    (301, "PermanentRedirect", {"x-amz-bucket-region": "eu-west-1"},
     r"bucket 'b' is not served at AWS \(us-east-1\) \(it is in eu-west-1: set "
     r"AWS_REGION=eu-west-1\) \[S3 error PermanentRedirect, HTTP 301\]", errno.EIO),
    (403, "RequestTimeTooSkewed", {}, "clock differs from the server's", errno.EACCES),
    (400, "ExpiredToken", {}, r"session token .* is expired or invalid \(access key id "
     r"\*\*\*\*1234 from the environment\)", errno.EACCES),
    (404, None, {}, r"no object 'k\.qcow2' in bucket 'b' \[HTTP 404\]", errno.ENOENT),
    (500, "InternalError", {}, r"GET refused: We encountered an internal error\. \[S3 error "
     r"InternalError, HTTP 500\]", errno.EIO),
])
def test_s3_errors_named(status: int, code: str | None, headers: dict[str, str],
                         expected: str, err: int) -> None:
    """S3's error documents become messages naming the object and the code (the answers that
    radosgw does not give: another region, a skewed clock, an expired token, no document)."""
    from vdiskfs.drivers.protocol.http.pool import Response
    from vdiskfs.drivers.protocol.s3 import Credentials, S3Node

    node = S3Node("s3://b/k.qcow2", S3Config(None, "us-east-1",
                                             Credentials("AKIAEXAMPLE1234", SECRET)))
    body = b"" if code is None else (
        f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>We encountered an internal "
        "error.</Message></Error>").encode()
    error = node._s3_error(Response(status, headers, body), "GET", body, 0)
    assert str(error).startswith("s3://b/k.qcow2: ")
    assert error.errno == err
    assert SECRET not in str(error)
    assert re.search(expected, str(error)), str(error)
