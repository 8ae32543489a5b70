"""vdiskfs: look inside virtual disks.

The package is a driver stack (:mod:`vdiskfs.block`, :mod:`vdiskfs.drivers`), a FUSE file system
over it (:mod:`vdiskfs.fs`) and a command line (:mod:`vdiskfs.cli`).
"""

__version__ = "0.1.0"
