"""Format driver ``vhdx`` (Hyper-V): the package's modules follow the file's structures.

``headers`` (file identifier, the two headers), ``region`` (region table), ``metadata``
(metadata table and items, parent locator), ``bat`` (BAT geometry and the pure mapping),
``log`` (log search and in-memory replay), ``crc32c`` (the checksum), ``driver`` (the node).
"""

from vdiskfs.drivers.format.vhdx.driver import VhdxCounters, VhdxNode

__all__ = ["VhdxCounters", "VhdxNode"]
