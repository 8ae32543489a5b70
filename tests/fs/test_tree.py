"""What the mount shows, built without FUSE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.images import create, qemu_io
from vdiskfs.block.registry import open_image
from vdiskfs.fs.tree import DirEntry, Export, FileSystemTree, ImageEntry, StatsEntry


async def test_stats_names_show_the_chain(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2", "1M")
    create(tmp_path / "top.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(tmp_path / "base.qcow2", "write -P 7 0 64k")
    node = await open_image(str(tmp_path / "top.qcow2"))
    try:
        tree = FileSystemTree([Export("top", node)], {"vm": lambda: {"exits": 3}})
        root = tree.entries[1]
        assert isinstance(root, DirEntry)
        assert list(root.children) == ["top.raw", "stats"]
        stats = tree.entries[root.children["stats"]]
        assert isinstance(stats, DirEntry) and list(stats.children) == ["top", "vm"]
        top = tree.entries[stats.children["top"]]
        assert isinstance(top, DirEntry)
        assert list(top.children) == ["tree", "0-qcow2", "1-file", "2-qcow2", "3-file"]
        backing = tree.entries[top.children["2-qcow2"]]
        assert isinstance(backing, StatsEntry)
        facts = json.loads(backing.render())
        assert facts["role"] == "backing" and facts["parent"] == "0-qcow2"
        assert facts["children"] == ["3-file"]
        text = tree.entries[top.children["tree"]]
        assert isinstance(text, StatsEntry)
        lines = text.render().decode().splitlines()
        assert lines[2].startswith("  2-qcow2  (backing)") and lines[3].startswith("    3-file")
        vm = tree.entries[stats.children["vm"]]
        assert isinstance(vm, StatsEntry) and json.loads(vm.render()) == {"exits": 3}
        image = tree.entries[root.children["top.raw"]]
        assert isinstance(image, ImageEntry) and image.mode & 0o777 == 0o444
        with pytest.raises(ValueError, match="two exports"):
            FileSystemTree([Export("top", node), Export("top", node)])
    finally:
        await node.aclose()
