"""Protocol driver ``rbd``: Ceph RBD images through librbd's Python binding.

:mod:`.spec` parses QEMU's ``rbd:`` names (pure, no I/O) and :mod:`.node` is the
:class:`~vdiskfs.block.node.BlockNode` with its registered opener. Importing this package
does not import librbd: that happens at the first open, so vdiskfs works without it.
"""

from vdiskfs.drivers.protocol.rbd.node import RbdNode, open_rbd
from vdiskfs.drivers.protocol.rbd.spec import RbdSpec, parse_spec

__all__ = ["RbdNode", "RbdSpec", "open_rbd", "parse_spec"]
