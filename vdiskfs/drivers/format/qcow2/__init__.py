"""Format driver ``qcow2`` (read side).

Modules: :mod:`.header` (header and extensions, validated), :mod:`.mapping` (guest offsets to
host runs, pure), :mod:`.l2cache` (the node's L2 slice cache), :mod:`.compression` (bounded
zlib/zstd cluster decoding), :mod:`.snapshots` (the internal snapshot table), :mod:`.driver`
(the :class:`Qcow2Node` that does the I/O).
"""

from vdiskfs.drivers.format.qcow2.driver import Qcow2Counters, Qcow2Node

__all__ = ["Qcow2Counters", "Qcow2Node"]
