"""The drivers: ``format/``, ``protocol/``, ``filter/``.

Importing this package loads none of them: the registry (:mod:`vdiskfs.block.registry`) lists
the driver modules and imports them the first time it looks a driver up.
"""
