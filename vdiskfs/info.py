"""``vdiskfs info``: what ``qemu-img info`` says about an image, from our own tree.

The JSON form uses QEMU's ``ImageInfo`` field names (``virtual-size``, ``actual-size``,
``cluster-size``, ``backing-filename``, ``format-specific``..., the backing image nested under
``backing-image`` as in QAPI), plus vdiskfs's own ``partitions``, ``warnings`` and ``children``
(external data files, extents), and in each internal snapshot its ``virtual-size`` and the
``mount-file`` that ``vdiskfs mount`` shows it as. The text form follows
``qemu-img info --backing-chain``: one block per image of the chain.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from vdiskfs.block.node import BlockNode, NodeKind
from vdiskfs.block.registry import redact_reference

__all__ = ["format_text", "image_info", "size_to_str"]


def image_info(node: BlockNode, filename: str | None = None) -> dict[str, Any]:
    """The info dict of ``node`` (a format node opened by ``open_image``) and its chain."""
    file = node.child("file")
    info: dict[str, Any] = {
        "filename": filename if filename is not None else node.label,
        "format": node.driver,
        "virtual-size": node.size,
    }
    if file is not None:
        actual = file.info().get("disk_size")
        if actual is not None:
            info["actual-size"] = actual
    info["dirty-flag"] = False
    info.update(node.info())
    if "snapshots" not in info:
        # A format without snapshots lists its protocol's (an RBD image's), as QEMU's
        # bdrv_snapshot_list falls through to the file child.
        protocol = _protocol_below(node)
        if protocol is not None and protocol.info().get("snapshots"):
            info["snapshots"] = protocol.info()["snapshots"]
    # Names recorded in the image may be URLs with credentials (``json:`` ones too): shown
    # redacted, as every label is.
    for key in ("backing-filename", "full-backing-filename"):
        if key in info:
            info[key] = redact_reference(info[key])
    specific = info.get("format-specific", {}).get("data", {})
    if "data-file" in specific:
        specific["data-file"] = redact_reference(specific["data-file"])
    backing = node.child("backing")
    if backing is not None:
        info.setdefault("backing-filename", backing.label)
        info["full-backing-filename"] = backing.label
        info.setdefault("backing-filename-format", backing.driver)
        info["backing-image"] = image_info(backing)
    children = [
        {"role": edge.role, "filename": edge.node.label, "format": edge.node.driver}
        for edge in node.children
        if edge.role not in ("file", "backing")
    ]
    if children:
        info["children"] = children
    return info


def _protocol_below(node: BlockNode) -> BlockNode | None:
    """The protocol node under ``node``'s ``file`` child, through filters (the read cache)."""
    file = node.child("file")
    while file is not None and file.kind != NodeKind.PROTOCOL:
        file = file.child("file")
    return file


def size_to_str(value: int) -> str:
    """Human size as QEMU's ``size_to_str`` prints it (3 significant digits, binary units)."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = max(0, min((exponent - 1) // 10, len(suffixes) - 1))
    return f"{_g3(value / (1 << (index * 10)))} {suffixes[index]}B"


def _g3(x: float) -> str:
    return f"{x:.3g}"


def format_text(info: dict[str, Any]) -> str:
    """``qemu-img info --backing-chain`` style text for an info dict and its chain."""
    blocks = []
    current: dict[str, Any] | None = info
    while current is not None:
        blocks.append(_format_one(current))
        current = current.get("backing-image")
    return "\n".join(blocks)


def _format_one(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
    ]
    if "actual-size" in info:
        lines.append(f"disk size: {size_to_str(info['actual-size'])}")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    for child in info.get("children", []):
        lines.append(f"{child['role']}: {child['filename']} ({child['format']})")
    snapshots = info.get("snapshots") or []
    if snapshots:
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<17} {'VM SIZE':>7} {'DATE':>20} {'VM CLOCK':>12} ICOUNT")
        for snap in snapshots:
            lines.append(_snapshot_line(snap))
        if any("mount-file" in snap for snap in snapshots):
            lines.append("Snapshot files (vdiskfs mount):")
            for snap in snapshots:
                lines.append(f"    {_printable(snap.get('id', '')):<10}"
                             f"{size_to_str(snap.get('virtual-size', 0)):>10}  "
                             f"{_printable(snap.get('mount-file', ''))}")
    specific = info.get("format-specific")
    if specific and specific.get("data"):
        lines.append("Format specific information:")
        lines.extend(_dump(specific["data"], 1))
    partitions = info.get("partitions")
    if partitions:
        lines.append(f"Partition table: {partitions.get('scheme')}")
        for part in partitions.get("entries", []):
            name = f" {part['name']!r}" if part.get("name") else ""
            lines.append(
                f"    {part['number']:>3}  start {part['start']:>12}  size "
                f"{size_to_str(part['size']):>9}  type {part['type']}"
                f" ({part.get('type-name') or 'unknown'}){name}"
            )
    for warning in info.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines) + "\n"


def _snapshot_line(snap: dict[str, Any]) -> str:
    date = datetime.datetime.fromtimestamp(snap.get("date-sec", 0)).strftime("%Y-%m-%d %H:%M:%S")
    clock_ns = snap.get("vm-clock-sec", 0) * 1_000_000_000 + snap.get("vm-clock-nsec", 0)
    secs, ns = divmod(clock_ns, 1_000_000_000)
    hours, rem = divmod(secs, 3600)
    minutes, seconds = divmod(rem, 60)
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}.{ns // 1_000_000:03d}"
    vm_size = size_to_str(snap.get("vm-state-size", 0))
    return (
        f"{_printable(snap.get('id', '')):<10}{_printable(snap.get('name', '')):<17} "
        f"{vm_size:>7} {date:>20} "
        f"{clock:>12} {snap.get('icount', 0):>10}"
    )


def _printable(text: str, limit: int = 64) -> str:
    """A name from the image as one safe line of text: as it is when it is short and has no
    control characters (what qemu-img prints), else quoted, escaped and cut."""
    if len(text) <= limit and text.isprintable():
        return text
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _dump(value: Any, depth: int) -> list[str]:
    """QEMU's ``dump_qobject`` layout: nested dicts and lists, keys with spaces."""
    pad = "    " * depth
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in
                                                            enumerate(value))
    for key, item in items:
        key = str(key).replace("-", " ")
        if isinstance(item, dict | list):
            lines.append(f"{pad}{key}:")
            lines.extend(_dump(item, depth + 1))
        else:
            lines.append(f"{pad}{key}: {_scalar(item)}")
    return lines


def _scalar(item: Any) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    return str(item)

