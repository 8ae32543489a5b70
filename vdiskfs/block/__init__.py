"""The driver stack: the node contract, the registry, statistics."""

from vdiskfs.block.node import BlockNode, BlockStatus, Child, FilterNode, NodeKind
from vdiskfs.block.registry import OpenOptions, open_image
from vdiskfs.block.stats import Op, StatsSnapshot

__all__ = [
    "BlockNode",
    "BlockStatus",
    "Child",
    "FilterNode",
    "NodeKind",
    "Op",
    "OpenOptions",
    "StatsSnapshot",
    "open_image",
]
