"""The synchronous file over a node (vdiskfs.block.syncfile), as dissect uses it: from a
worker thread of the node's trio loop."""

from __future__ import annotations

import io

import pytest
import trio

from tests.support.images import random_bytes
from tests.support.partitioned import MemoryNode
from vdiskfs.block.syncfile import BUFFER_SIZE, open_node_file


async def test_seek_and_read_from_a_worker_thread() -> None:
    data = random_bytes(7, 3 * BUFFER_SIZE + 123)
    node = MemoryNode(data)

    def work() -> list[bytes]:
        f = open_node_file(node)
        out = [f.read(10)]
        f.seek(BUFFER_SIZE - 5)
        out.append(f.read(10))  # across the read-ahead buffer's end
        f.seek(-3, io.SEEK_END)
        out.append(f.read(100))  # short at the end
        out.append(f.read(1))  # EOF
        f.seek(0)
        out.append(f.read())
        return out

    first, across, tail, eof, whole = await trio.to_thread.run_sync(work)
    assert first == data[:10]
    assert across == data[BUFFER_SIZE - 5:BUFFER_SIZE + 5]
    assert tail == data[-3:] and eof == b""
    assert whole == data
    # Every read went through the node's accounting (one per buffer refill, not per call).
    reads = node.stats_snapshot().as_dict()["rd_operations"]
    assert 0 < reads < 20


async def test_a_negative_seek_is_refused() -> None:
    def work() -> None:
        open_node_file(MemoryNode(b"x" * 10)).seek(-1)

    with pytest.raises(ValueError, match="negative seek position"):
        await trio.to_thread.run_sync(work)
