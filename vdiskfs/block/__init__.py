"""The driver stack: the node contract, the registry, statistics.

Opening an image is :mod:`vdiskfs.block.context` (``open_image``, ``OpenOptions``); it is not
imported here, because it imports the file and cache drivers, which import this package's
modules: every driver would find it half-initialised.
"""

from vdiskfs.block.node import BlockNode, BlockStatus, Child, FilterNode, NodeKind
from vdiskfs.block.stats import Op, StatsSnapshot

__all__ = [
    "BlockNode",
    "BlockStatus",
    "Child",
    "FilterNode",
    "NodeKind",
    "Op",
    "StatsSnapshot",
]
