"""Probing: no format driver claims an image of another format (all pairs in the registry)."""

from __future__ import annotations

import pytest

from tests.support.images import create, qemu_io
from vdiskfs.block.registry import PROBE_HEAD, PROBE_TAIL, driver_names, get_driver, probe

MIB = 1 << 20

#: Formats qemu-img makes, with options for the variants whose layout differs.
IMAGES: dict[str, tuple[str, dict[str, object]]] = {
    "raw": ("raw", {}),
    "qcow2": ("qcow2", {}),
    "qed": ("qed", {}),
    "vdi": ("vdi", {}),
    "vdi-static": ("vdi", {"static": True}),
    "vhdx": ("vhdx", {}),
    "vhdx-fixed": ("vhdx", {"subformat": "fixed", "block_size": "1M"}),
    "vmdk": ("vmdk", {}),
    "vmdk-flat": ("vmdk", {"subformat": "monolithicFlat"}),
    "vpc": ("vpc", {}),
    "vpc-fixed": ("vpc", {"subformat": "fixed"}),
}


@pytest.fixture(scope="session")
def probe_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes, bytes]]:
    d = tmp_path_factory.mktemp("probe")
    out = {}
    for name, (fmt, options) in IMAGES.items():
        path = create(d / f"{name}.img", 4 * MIB, fmt, **options)
        qemu_io(path, "write -P 0x5a 0 64k", fmt=fmt)
        data = path.read_bytes()
        out[name] = (fmt, data[:PROBE_HEAD], data[-PROBE_TAIL:])
    return out


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("driver", driver_names())
def test_probe_does_not_fire_on_other_formats(
        probe_bytes: dict[str, tuple[str, bytes, bytes]], image: str, driver: str) -> None:
    fmt, head, tail = probe_bytes[image]
    score = get_driver(driver).probe(head, tail, f"disk.{fmt}")
    if driver == "raw":
        assert score == 1
    elif driver == fmt:
        assert score > 1
    else:
        assert score == 0, f"{driver} probes a {image} image as its own"


@pytest.mark.parametrize("image", IMAGES)
def test_probe_picks_the_format(probe_bytes: dict[str, tuple[str, bytes, bytes]],
                                image: str) -> None:
    fmt, head, tail = probe_bytes[image]
    if fmt not in driver_names():
        pytest.skip(f"no {fmt} driver registered")
    cls, _score = probe(head, tail, f"disk.{fmt}")
    assert cls.driver == fmt
