"""Every driver module; importing this package registers the format drivers."""

from vdiskfs.drivers.format import raw  # noqa: F401
