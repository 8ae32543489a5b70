"""One small image of every format qemu-img writes, to check probes against each other.

A probe must recognise its own format and never claim another's: for each image of
:func:`build_probe_corpus`, the driver of its format (when registered) must outscore every other
driver, and raw must win for plain data.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.images import create, qemu_io, random_bytes
from vdiskfs.block.registry import PROBE_HEAD, PROBE_TAIL, driver_names, get_driver

__all__ = ["assert_claims_only_its_own", "build_probe_corpus", "probe_scores"]


def build_probe_corpus(directory: Path) -> dict[str, tuple[Path, str]]:
    """``name -> (image, format)``; the format is the driver name that must win the probe."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus: dict[str, tuple[Path, str]] = {}

    raw = directory / "plain.raw"
    raw.write_bytes(random_bytes(11, 1 << 20))
    corpus["raw"] = (raw, "raw")
    for fmt, options in (
        ("qcow2", {}),
        ("qed", {}),
        ("vdi", {}),
        ("vhdx", {}),
        ("vmdk", {"subformat": "monolithicSparse"}),
        ("vmdk", {"subformat": "streamOptimized"}),
        ("vmdk", {"subformat": "monolithicFlat"}),
        ("vpc", {"subformat": "dynamic"}),
        ("vpc", {"subformat": "fixed"}),
    ):
        name = f"{fmt}-{options['subformat']}" if options else fmt
        path = directory / f"{name}.img"
        create(path, "2M", fmt, **options)
        if options.get("subformat") != "streamOptimized":
            qemu_io(path, "write -P 0x5c 64k 64k", fmt=fmt)
        corpus[name] = (path, fmt)
    # The flat extent of a monolithicFlat disk is plain data.
    corpus["vmdk-flat-extent"] = (directory / "vmdk-monolithicFlat-flat.img", "raw")
    return corpus


def probe_scores(path: Path) -> dict[str, int]:
    """Every registered format driver's probe score for the image at ``path``."""
    data = path.read_bytes()
    head = data[:PROBE_HEAD]
    tail = data[-PROBE_TAIL:] if len(data) >= PROBE_TAIL else data
    return {name: get_driver(name).probe(head, tail, str(path)) for name in driver_names()}


def assert_claims_only_its_own(driver: str, directory: Path) -> None:
    """Over the corpus built in ``directory``: ``driver`` outscores every other driver on the
    images of its format, and scores 0 on all the others."""
    for name, (path, fmt) in build_probe_corpus(directory).items():
        scores = probe_scores(path)
        if fmt == driver:
            others = {k: v for k, v in scores.items() if k != driver}
            assert scores[driver] > max(others.values()), (name, scores)
        else:
            assert scores[driver] == 0, (name, scores)
