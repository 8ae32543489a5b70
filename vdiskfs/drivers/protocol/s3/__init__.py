"""Protocol driver ``s3``: objects of S3-compatible stores by ``s3://BUCKET/KEY``.

:mod:`.sigv4` signs requests (pure), :mod:`.config` reads the AWS environment and config files
and parses the URL, :mod:`.node` is the node (an http node whose requests are signed) with its
registered opener.
"""

from vdiskfs.drivers.protocol.s3.config import Credentials, S3Config, S3Location, parse_s3_url
from vdiskfs.drivers.protocol.s3.node import S3Error, S3Node, open_s3

__all__ = ["Credentials", "S3Config", "S3Error", "S3Location", "S3Node", "open_s3",
           "parse_s3_url"]
