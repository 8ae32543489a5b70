"""The mounted file system's tree: what appears under MOUNTPOINT, independent of pyfuse3.

::

    MOUNTPOINT/
      <stem>.raw                 every image, as its guest sees it
      <stem>-part<N>.raw         every partition: a raw window onto <stem>.raw
      <stem>@<snapshot>.raw      every internal snapshot, read-only (snapshot_file_names)
      <stem>@<snapshot>-part<N>.raw
      stats/
        <stem>/
          tree                   the node tree, one line per node
          0-qcow2                one JSON object per node, pre-order from the top...
          1-file
          2-qcow2                ...so a backing file follows its parent's own children
          3-file
          throttle               a setting of a node (the throttle's limits): read and write it
        <stem>-part<N>/0-offset  the partition window's own node (an offset filter)
        <extra>                  sources added by the embedder (the emulator's vm, virtio-blk)

The tree is fixed when the file system is built: images are not added or removed while mounted,
so inode numbers and readdir cookies are simply indexes and stay stable.
"""

from __future__ import annotations

import json
import re
import stat
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vdiskfs.block.format import SnapshotEntry
from vdiskfs.block.node import BlockNode

__all__ = [
    "DirEntry",
    "Export",
    "FileSystemTree",
    "ImageEntry",
    "StatsEntry",
    "node_stats_entries",
    "node_stats_sources",
    "render_json",
    "snapshot_file_names",
]

ROOT_INODE = 1
StatsSource = Callable[[], Mapping[str, Any]]
#: Longest snapshot name (in UTF-8 bytes) used in a file name; a longer one goes by its ID. With
#: the stem and ``-part<N>.raw`` the file name must stay within NAME_MAX (255).
SNAPSHOT_NAME_MAX = 200
_NAME_MAX = 255
#: The longest suffix a snapshot's export gets: a partition file of a GPT disk.
_LONGEST_SUFFIX = len("-part128.raw")


def snapshot_file_names(stem: str, snapshots: Sequence[SnapshotEntry],
                        taken: Collection[str] = ()) -> list[str]:
    """The export name ``<stem>@<x>`` of each internal snapshot of the image shown as
    ``<stem>``: ``x`` is the snapshot's name where it makes a safe file name, else its ID, else
    ``snapshot<N>`` (its position in the table, from 1).

    Snapshot names are any text the image holds (a hostile one: ``/``, NUL, control
    characters, ``..``, kilobytes). A name is used only when it is not empty, has none of
    those, does not end like a partition file (``-part<N>``), fits :data:`SNAPSHOT_NAME_MAX`,
    no other snapshot has it, and it collides with no export name in ``taken`` (the other
    images' stems) nor one chosen before it. The mapping is deterministic, so ``vdiskfs info``
    prints the same one.
    """
    names = Counter(s.name for s in snapshots)
    ids = Counter(s.id for s in snapshots)
    chosen: list[str] = []
    used = set(taken)
    for number, snapshot in enumerate(snapshots, 1):
        candidates = []
        if names[snapshot.name] == 1:
            candidates.append(snapshot.name)
        if ids[snapshot.id] == 1:
            candidates.append(snapshot.id)
        candidates.append(f"snapshot{number}")
        for candidate in candidates:
            name = f"{stem}@{candidate}"
            if _safe_component(candidate) and _fits(name) and name not in used:
                break
        else:
            # snapshot<N> was taken by another snapshot's name: count on until free.
            extra = number
            while name in used:
                extra += len(snapshots)
                name = f"{stem}@snapshot{extra}"
        used.add(name)
        chosen.append(name)
    return chosen


#: A name ending like a partition file's suffix could collide with a partition of another
#: snapshot (``<stem>@1-part1``): such names go by their ID too.
_PARTITION_SUFFIX = re.compile(r"-part[0-9]+\Z")


def _safe_component(text: str) -> bool:
    return (
        bool(text)
        and not _PARTITION_SUFFIX.search(text)
        and "/" not in text
        and ".." not in text
        and text != "."
        and not any(ord(c) < 32 or ord(c) == 127 for c in text)
        and len(text.encode("utf-8", "surrogatepass")) <= SNAPSHOT_NAME_MAX
    )


def _fits(export_name: str) -> bool:
    return len(export_name.encode("utf-8", "surrogatepass")) + _LONGEST_SUFFIX <= _NAME_MAX


@dataclass
class Export:
    """One raw file of the mount: a whole image or a partition window.

    ``direct_io`` bypasses the kernel page cache for this file: needed when something else (a
    running guest) writes the node, so that readers never see stale pages.
    """

    name: str
    node: BlockNode
    writable: bool = False
    direct_io: bool = False
    #: Written since the last flush: closing the file flushes the tree only then.
    dirty: bool = False


@dataclass
class DirEntry:
    inode: int
    name: str
    children: dict[str, int] = field(default_factory=dict)
    mode: int = stat.S_IFDIR | 0o555


@dataclass
class ImageEntry:
    inode: int
    name: str
    export: Export

    @property
    def mode(self) -> int:
        return stat.S_IFREG | (0o644 if self.export.writable else 0o444)


@dataclass
class StatsEntry:
    """A file whose content is rendered when it is read (live statistics); with ``write``, a
    node's setting (:class:`~vdiskfs.block.node.Control`) that writing changes."""

    inode: int
    name: str
    render: Callable[[], bytes]
    write: Callable[[str], None] | None = None

    @property
    def mode(self) -> int:
        return stat.S_IFREG | (0o444 if self.write is None else 0o644)


Entry = DirEntry | ImageEntry | StatsEntry


def render_json(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def node_stats_entries(root: BlockNode) -> list[tuple[str, Callable[[], bytes]]]:
    """Stats files for a node tree: ``tree`` plus ``<n>-<driver>`` per node, pre-order."""
    tree, nodes = node_stats_sources(root)
    return [("tree", lambda: tree().encode()),
            *((name, _source_renderer(source)) for name, source in nodes)]


def node_stats_sources(
    root: BlockNode,
) -> tuple[Callable[[], str], list[tuple[str, StatsSource]]]:
    """What :func:`node_stats_entries` renders: the ``tree`` text, and each node's statistics
    as a dict by file name (``vdiskfs boot --stats`` renders them into one JSON document).

    Only edges the tree owns are followed: a partition window does not repeat its disk's nodes.
    """
    order: list[tuple[int, str, BlockNode, int | None]] = []  # depth, role, node, parent index
    parents: list[int] = []
    for depth, role, node in _walk_owned(root):
        del parents[depth:]
        order.append((depth, role, node, parents[-1] if parents else None))
        parents.append(len(order) - 1)
    names = [f"{i}-{node.driver}" for i, (_, _, node, _) in enumerate(order)]
    children: dict[int, list[str]] = {}
    for i, (_, _, _, parent) in enumerate(order):
        if parent is not None:
            children.setdefault(parent, []).append(names[i])

    def tree_text() -> str:
        lines = []
        for i, (depth, role, node, _) in enumerate(order):
            what = f"({role}) " if role else ""
            lines.append(f"{'  ' * depth}{names[i]}  {what}{node.label}  size={node.size}")
        return "\n".join(lines) + "\n"

    sources: list[tuple[str, StatsSource]] = []
    for i, (_depth, role, node, parent) in enumerate(order):
        identity = {
            "node": names[i],
            "driver": node.driver,
            "kind": str(node.kind),
            "role": role or None,
            "parent": names[parent] if parent is not None else None,
            "children": children.get(i, []),
            "filename": node.label,
            "size": node.size,
        }
        sources.append((names[i], _node_stats(identity, node)))
    return tree_text, sources


def _node_stats(identity: dict[str, Any], node: BlockNode) -> StatsSource:
    return lambda: {**identity, "size": node.size, **node.stats_snapshot().as_dict()}


def _walk_owned(root: BlockNode) -> list[tuple[int, str, BlockNode]]:
    out: list[tuple[int, str, BlockNode]] = []
    stack: list[tuple[int, str, BlockNode]] = [(0, "", root)]
    while stack:
        depth, role, node = stack.pop()
        out.append((depth, role, node))
        for edge in reversed(node.children):
            if edge.owned:
                stack.append((depth + 1, edge.role, edge.node))
    return out


class FileSystemTree:
    """Inodes of the mount, built once from the exports and the extra stats sources."""

    def __init__(
        self,
        exports: list[Export],
        extra_stats: Mapping[str, StatsSource] | None = None,
    ) -> None:
        self.entries: dict[int, Entry] = {}
        self._next_inode = ROOT_INODE
        self.root = self._add_dir("")
        seen: set[str] = set()
        for export in exports:
            filename = f"{export.name}.raw"
            if filename in seen:
                raise ValueError(f"two exports named {filename}")
            seen.add(filename)
            self._link(self.root, ImageEntry(self._alloc(), filename, export))
        stats_dir = self._add_dir("stats", parent=self.root)
        for export in exports:
            directory = self._add_dir(export.name, parent=stats_dir)
            for name, render in node_stats_entries(export.node):
                self._link(directory, StatsEntry(self._alloc(), name, render))
            for _, _, node in _walk_owned(export.node):
                for control in node.controls():
                    self._link(directory, StatsEntry(self._alloc(), control.name,
                                                     _control_renderer(control.read),
                                                     control.write))
        for path, source in (extra_stats or {}).items():
            *dirs, name = path.split("/")
            parent = stats_dir
            for part in dirs:
                existing = parent.children.get(part)
                entry = self.entries[existing] if existing else None
                parent = entry if isinstance(entry, DirEntry) else self._add_dir(part, parent)
            self._link(parent, StatsEntry(self._alloc(), name, _source_renderer(source)))

    def _alloc(self) -> int:
        inode = self._next_inode
        self._next_inode += 1
        return inode

    def _link(self, parent: DirEntry, entry: Entry) -> None:
        if entry.name in parent.children:
            raise ValueError(f"duplicate name {entry.name!r} under {parent.name or '/'}")
        parent.children[entry.name] = entry.inode
        self.entries[entry.inode] = entry

    def _add_dir(self, name: str, parent: DirEntry | None = None) -> DirEntry:
        entry = DirEntry(self._alloc(), name)
        if parent is None:
            self.entries[entry.inode] = entry
        else:
            self._link(parent, entry)
        return entry

    def images(self) -> list[ImageEntry]:
        return [e for e in self.entries.values() if isinstance(e, ImageEntry)]


def _control_renderer(read: Callable[[], str]) -> Callable[[], bytes]:
    return lambda: read().encode()


def _source_renderer(source: StatsSource) -> Callable[[], bytes]:
    return lambda: render_json(source())
