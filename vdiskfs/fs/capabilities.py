"""What the installed pyfuse3 can do.

``scripts/setup.sh`` builds pyfuse3 from its PyPI sdist with the project's patch
(``scripts/pyfuse3/``), which registers libfuse's ``lseek`` and ``fallocate`` handlers (the
``Operations`` methods of the same names) and sets the connection limits given as
``Operations`` class attributes (``max_background``, ``congestion_threshold``, ``max_write``,
``max_readahead``) at FUSE INIT. A vdiskfs installed with plain pip gets the unpatched pyfuse3:
then the kernel answers SEEK_DATA/SEEK_HOLE itself (the whole file is data), fallocate(2) fails
with EOPNOTSUPP, and the limits must be written through fusectl after mounting.
"""

from __future__ import annotations

import pyfuse3

__all__ = ["pyfuse3_has_init_limits", "pyfuse3_has_lseek_fallocate"]


def pyfuse3_has_lseek_fallocate() -> bool:
    """Whether pyfuse3 passes lseek (SEEK_DATA/SEEK_HOLE) and fallocate requests to the
    ``Operations`` methods ``lseek(fh, off, whence)`` and ``fallocate(fh, mode, off, length)``.
    """
    return hasattr(pyfuse3.Operations, "lseek") and hasattr(pyfuse3.Operations, "fallocate")


def pyfuse3_has_init_limits() -> bool:
    """Whether pyfuse3 applies the ``Operations`` connection limits (``max_background`` and
    friends) at FUSE INIT; an unpatched one ignores them."""
    # The base class itself: a subclass (VdiskOperations) sets them either way.
    return "max_background" in vars(pyfuse3.Operations)
