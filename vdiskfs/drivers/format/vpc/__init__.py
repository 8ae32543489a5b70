"""Format driver ``vpc`` (VHD): footer and dynamic header structures, BAT mapping, the node."""

from vdiskfs.drivers.format.vpc.driver import VpcCounters, VpcNode

__all__ = ["VpcCounters", "VpcNode"]
