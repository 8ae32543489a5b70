"""What the mount shows, built without FUSE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.images import create, qemu_io
from vdiskfs.block.context import open_image
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


async def test_a_node_setting_is_a_writable_file_beside_its_stats(tmp_path: Path) -> None:
    from vdiskfs.drivers.filter.offset import OffsetNode
    from vdiskfs.drivers.filter.throttle import ThrottleGroups, throttled
    from vdiskfs.drivers.filter.throttle_buckets import parse_throttle

    create(tmp_path / "d.qcow2", "1M")
    node = await throttled(await open_image(str(tmp_path / "d.qcow2")), ThrottleGroups(),
                           parse_throttle("iops-total=100"), "d")
    window = OffsetNode(node, offset=4096, length=8192, owns_child=False)
    await window.open()
    try:
        tree = FileSystemTree([Export("d", node), Export("d-part1", window)])
        root = tree.entries[1]
        assert isinstance(root, DirEntry)
        stats = tree.entries[root.children["stats"]]
        assert isinstance(stats, DirEntry)
        disk = tree.entries[stats.children["d"]]
        part = tree.entries[stats.children["d-part1"]]
        assert isinstance(disk, DirEntry) and isinstance(part, DirEntry)
        assert list(disk.children) == ["tree", "0-throttle", "1-qcow2", "2-file", "throttle"]
        assert list(part.children) == ["tree", "0-offset"]  # the disk's setting is not repeated
        control = tree.entries[disk.children["throttle"]]
        assert isinstance(control, StatsEntry) and control.write is not None
        assert control.mode & 0o777 == 0o644
        assert control.render() == b"iops-total=100,group=d\n"
        control.write("iops-total=200")
        assert control.render() == b"iops-total=200,group=d\n"
        others = tree.entries[disk.children["tree"]]
        assert isinstance(others, StatsEntry) and others.mode & 0o777 == 0o444
    finally:
        await node.aclose()
