"""Overlays: a new qcow2 image over an image that must not change (``--overlay``).

The overlay records its backing file by a path relative to its own directory (when the two are
on the same tree, which on POSIX is always expressible) and the backing file's format, so that
``qemu-img commit``/``rebase`` and QEMU itself can use it later. Opening an existing overlay
continues it, after checking that it really is an overlay of that image.
"""

from __future__ import annotations

import os
from dataclasses import replace

from vdiskfs.block.context import OpenOptions, open_image, run_blocking
from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import is_network_name, redact_url, url_scheme
from vdiskfs.drivers.format.qcow2.create import create_qcow2
from vdiskfs.errors import UnsupportedError, VdiskError
from vdiskfs.urlargs import protocol_kind

__all__ = ["open_overlay"]


async def open_overlay(image: str, overlay: str, options: OpenOptions) -> BlockNode:
    """Open ``overlay`` writable with ``image`` as its read-only backing file.

    ``options.format`` is the format of ``image``. A missing overlay is created first, of the
    image's virtual size; if opening it then fails, the new file is removed again.
    """
    if url_scheme(image) is not None and not is_network_name(image):
        # The overlay would record the URL as its backing file: an https one with its
        # credentials, an s3:// one that QEMU cannot open. (An NBD URL or rbd: name carries
        # none -- the nbd driver refuses user names, the rbd one key= -- so it is recorded.)
        raise UnsupportedError(f"an overlay (--overlay, overlay=) over an {protocol_kind(image)} "
                               "image is not supported; download the image, or open it "
                               "read-only", path=redact_url(image))
    created = False
    # Off the event loop: a hung file system must not keep SIGTERM from ending the daemon.
    if not await run_blocking(lambda: os.path.exists(overlay)):
        base = await open_image(image, replace(options, read_only=True))
        try:
            size, fmt = base.size, base.driver
        finally:
            await base.aclose()
        if url_scheme(image) is not None:
            reference = image  # a URL (nbd://..., rbd:...) is recorded as given, as qemu-img does
        else:
            reference = os.path.relpath(os.path.abspath(image),
                                        os.path.dirname(os.path.abspath(overlay)))
        await create_qcow2(overlay, size, backing_file=reference, backing_format=fmt)
        created = True
    try:
        node = await open_image(overlay, replace(options, read_only=False, format="qcow2"))
    except BaseException:
        if created:
            os.unlink(overlay)
        raise
    backing = node.child("backing")
    if backing is None or await run_blocking(lambda: not _same_image(backing.label, image)):
        await node.aclose()
        found = backing.label if backing is not None else "no backing file"
        raise VdiskError(
            f"exists but is not an overlay of {image} (its backing file: {found})",
            path=overlay,
        )
    return node


def _same_image(label: str, image: str) -> bool:
    """Whether the overlay's backing node (its label) is ``image``: the same file, or the
    same URL."""
    if url_scheme(image) is not None or url_scheme(label) is not None:
        return label == image
    return os.path.realpath(label) == os.path.realpath(image)
