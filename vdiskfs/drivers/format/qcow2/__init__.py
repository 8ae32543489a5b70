"""Format driver ``qcow2``.

Modules: :mod:`.header` (layout, limits, decoding), :mod:`.extensions` (the header extension
area), :mod:`.header_checks` (the decoded header validated), :mod:`.mapping` (L2 entries to
host runs, pure), :mod:`.state` (the open image's state, shared by reads and the writer, and
its guest-to-host lookups), :mod:`.l2cache` (the L2 slice cache), :mod:`.compression` (bounded
zlib/zstd cluster decoding), :mod:`.snapshots` (the internal snapshot table), :mod:`.driver`
(the :class:`Qcow2Node` that does the I/O). Writing: :mod:`.writer` (the data path),
:mod:`.alloc` (how a write lands in a cluster, pure), :mod:`.allocate` (clusters, L2 tables,
links), :mod:`.zero` (zero and discard), :mod:`.writeback` (metadata order, frees),
:mod:`.refcount` (with :mod:`.refcount_codec`), :mod:`.metadata_cache`, :mod:`.check`
(repair of a dirty image), :mod:`.create`.
"""

from vdiskfs.drivers.format.qcow2.driver import Qcow2Counters, Qcow2Node

__all__ = ["Qcow2Counters", "Qcow2Node"]
