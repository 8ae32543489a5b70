"""Format driver ``vmdk`` (VMware): descriptor parser, sparse extents, mapping, the node."""

from vdiskfs.drivers.format.vmdk.driver import VmdkCounters, VmdkNode

__all__ = ["VmdkCounters", "VmdkNode"]
