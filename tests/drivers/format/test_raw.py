from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.images import random_bytes
from vdiskfs.block.context import OpenOptions, open_image


@pytest.fixture
def raw_image(tmp_path: Path) -> tuple[Path, bytes]:
    data = random_bytes(7, 3 * 1024 * 1024 + 123)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


async def test_conformance_read_only(raw_image: tuple[Path, bytes]) -> None:
    path, data = raw_image
    await check_block_node(lambda: open_image(str(path), OpenOptions(format="raw")), data)


async def test_conformance_writable(raw_image: tuple[Path, bytes]) -> None:
    path, data = raw_image
    await check_block_node(
        lambda: open_image(str(path), OpenOptions(format="raw", read_only=False)),
        data,
        writable=True,
    )


async def test_probed_raw_warns(raw_image: tuple[Path, bytes]) -> None:
    path, _ = raw_image
    node = await open_image(str(path))
    try:
        assert node.driver == "raw"
        assert any("probing guessed raw" in w for w in node.warnings)
    finally:
        await node.aclose()
    node = await open_image(str(path), OpenOptions(format="raw"))
    try:
        assert node.warnings == []
    finally:
        await node.aclose()

