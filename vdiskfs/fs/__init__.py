"""The FUSE file system over the driver stack.

Embedders (``vdiskfs mount``, the emulator's ``--mount``) build :class:`Export` objects for the
nodes they want to show, a :class:`VdiskOperations` over them (optionally with extra statistics
sources), and run :func:`serve` in their trio nursery.
"""

from vdiskfs.fs.mount import serve, unmount
from vdiskfs.fs.operations import VdiskOperations
from vdiskfs.fs.tree import Export

__all__ = ["Export", "VdiskOperations", "serve", "unmount"]
