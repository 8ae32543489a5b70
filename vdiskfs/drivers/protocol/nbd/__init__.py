"""Protocol driver ``nbd``: a Network Block Device client on trio sockets.

:mod:`.wire` packs and parses the messages, :mod:`.uri` parses ``nbd://`` URIs,
:mod:`.client` runs one connection (handshake, requests in flight, the reply reader) and
:mod:`.node` is the :class:`~vdiskfs.block.node.BlockNode` with its registered opener.
"""

from vdiskfs.drivers.protocol.nbd.node import NbdNode, open_nbd

__all__ = ["NbdNode", "open_nbd"]
