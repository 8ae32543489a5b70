"""Protocol driver ``http``/``https`` (:mod:`.node`) over a keep-alive connection pool
(:mod:`.pool`); importing it registers the URL schemes."""

from vdiskfs.drivers.protocol.http.node import HttpNode, open_http, redact_url
from vdiskfs.drivers.protocol.http.pool import HttpError

__all__ = ["HttpError", "HttpNode", "open_http", "redact_url"]
