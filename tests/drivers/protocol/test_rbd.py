"""The rbd protocol node against a real (throwaway) Ceph cluster, with QEMU's own rbd driver
as the reference: byte-for-byte reads of images put with ``rbd import``, the conformance
battery, writes that ``qemu-img compare``/``check`` accept, block status as ``qemu-img map``
sees it, snapshots, the exclusive lock, and clear errors."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import signal
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support.ceph import Cluster
from tests.support.conformance import check_block_node
from tests.support.holes import status_runs
from tests.support.images import create, qemu_img, qemu_io, random_bytes, reference_raw, run
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import opened
from vdiskfs.drivers.protocol.rbd import RbdNode
from vdiskfs.errors import LockedError, VdiskError

pytestmark = pytest.mark.ceph

_names = itertools.count()


def _unique(stem: str) -> str:
    """A fresh image name: every test gets its own images in the session's cluster."""
    return f"{stem}-{next(_names)}"


async def _open(name: str, read_only: bool = True) -> RbdNode:
    return await opened(RbdNode(name, read_only=read_only))


@pytest.fixture
def sparse_qcow2(tmp_path: Path) -> Path:
    """Data, zero clusters, discarded clusters and never-written ones (24 MiB)."""
    image = create(tmp_path / "sparse.qcow2", "24M")
    qemu_io(image, "write -P 0xab 1M 192k", "write -z 4M 1M", "write -P 0x11 9M 64k",
            "discard 9M 32k", "write -P 0x5a 23M 1M", "write -P 0x01 20M 1", fmt="qcow2")
    return image


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_imported_image_reads_as_qemu_converts_it(ceph_cluster: Cluster, fmt: str,
                                                        sparse_qcow2: Path,
                                                        tmp_path: Path) -> None:
    """``rbd import`` stores the file's bytes; the format probed on top reads the guest
    view byte for byte as ``qemu-img convert -O raw`` of the source."""
    source = sparse_qcow2
    if fmt == "raw":
        source = reference_raw(sparse_qcow2, tmp_path / "sparse.raw")
    image = _unique(f"import-{fmt}")
    ceph_cluster.rbd("import", source, f"rbd/{image}")
    want = reference_raw(source, tmp_path / "want.raw", fmt=fmt).read_bytes()
    root = await open_image(ceph_cluster.qemu_name(f"rbd/{image}"), OpenOptions(format=fmt))
    try:
        assert root.driver == fmt
        assert bytes(await root.pread(0, root.size)) == want
        rbd_node = [n for _, _, n in root.walk() if n.driver == "rbd"]
        assert len(rbd_node) == 1
        assert rbd_node[0].counters.max_requests_in_flight >= 1
    finally:
        await root.aclose()


async def test_many_requests_in_flight(ceph_cluster: Cluster) -> None:
    """librbd's completions come back through trio: 64 reads at once, no thread each."""
    data = random_bytes(7, 8 << 20)
    image = _unique("inflight")
    ceph_cluster.rbd("create", "--size", "8M", f"rbd/{image}")
    node = await _open(ceph_cluster.qemu_name(f"rbd/{image}"), read_only=False)
    try:
        await node.pwrite(0, data)
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = bytes(await node.pread(i * 128 << 10, 128 << 10))

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(read, i)
        assert b"".join(results[i] for i in range(64)) == data
        assert node.counters.max_requests_in_flight > 1
    finally:
        await node.aclose()


async def test_conformance_writable(ceph_cluster: Cluster, tmp_path: Path) -> None:
    data = random_bytes(3, 3 * 1024 * 1024 + 512)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    image = _unique("conformance")
    ceph_cluster.rbd("import", path, f"rbd/{image}")
    name = ceph_cluster.qemu_name(f"rbd/{image}")
    await check_block_node(lambda: _open(name, read_only=False), data, writable=True)


async def test_writes_compare_with_qemu(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """Writes, write-zeroes (with and without unmap) and a discard through vdiskfs, the same
    requests through qemu-io on a local copy: QEMU's rbd driver finds the two equal."""
    image = _unique("writes")
    ceph_cluster.rbd("create", "--size", "16M", f"rbd/{image}")
    local = create(tmp_path / "local.raw", "16M", fmt="raw")
    name = ceph_cluster.qemu_name(f"rbd/{image}")
    root = await open_image(name, OpenOptions(format="raw", read_only=False))
    try:
        await root.pwrite(0, b"\xab" * (1 << 20))
        await root.pwrite((5 << 20) + 17, b"\x5a" * 70000)
        await root.zero(1 << 19, 4096, may_unmap=False)
        await root.zero(4 << 20, 4 << 20, may_unmap=True)
        await root.pwrite((9 << 20) - 3, b"\x11" * 9)
        await root.discard(12 << 20, 4 << 20)
        await root.flush()
    finally:
        await root.aclose()
    qemu_io(local, "write -P 0xab 0 1M", f"write -P 0x5a {(5 << 20) + 17} 70000",
            "write -z 512k 4k", "write -z -u 4M 4M", f"write -P 0x11 {(9 << 20) - 3} 9",
            fmt="raw")
    qemu_img("compare", "-f", "raw", "-F", "raw", local, name)


async def test_qcow2_in_rbd_checks_clean_after_writes(ceph_cluster: Cluster,
                                                      tmp_path: Path) -> None:
    """A qcow2 stored in RBD, written by vdiskfs's qcow2 driver over the rbd node: QEMU
    (over its rbd driver) finds it clean and reads what vdiskfs wrote."""
    source = create(tmp_path / "disk.qcow2", "32M")
    image = _unique("qcow2-rw")
    ceph_cluster.rbd("import", source, f"rbd/{image}")
    # Room for the qcow2 file to grow into: an RBD image does not grow by itself.
    ceph_cluster.rbd("resize", "--size", "48M", f"rbd/{image}")
    name = ceph_cluster.qemu_name(f"rbd/{image}")
    rng = random_bytes(9, 1 << 20)
    model = bytearray(32 << 20)
    root = await open_image(name, OpenOptions(format="qcow2", read_only=False))
    try:
        for i in range(24):
            offset = (i * 1_300_007) % ((32 << 20) - 70000)
            chunk = rng[i * 4000 : i * 4000 + 70000]
            await root.pwrite(offset, chunk)
            model[offset : offset + len(chunk)] = chunk
        await root.zero(2 << 20, 1 << 20, may_unmap=True)
        model[2 << 20 : 3 << 20] = bytes(1 << 20)
        await root.flush()
    finally:
        await root.aclose()
    check = run("qemu-img", "check", "-f", "qcow2", name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert reference_raw(name, tmp_path / "out.raw", fmt="qcow2").read_bytes() == model


async def test_local_overlay_over_an_rbd_base(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """A local qcow2 whose backing file is an rbd: name, as ``qemu-img create -b`` records
    it: reads fall through to the cluster, writes stay local."""
    base_data = random_bytes(11, 4 << 20)
    raw = tmp_path / "base.raw"
    raw.write_bytes(base_data)
    image = _unique("base")
    ceph_cluster.rbd("import", raw, f"rbd/{image}")
    name = ceph_cluster.qemu_name(f"rbd/{image}")
    overlay = create(tmp_path / "top.qcow2", "4M", backing=name, backing_fmt="raw")
    qemu_io(overlay, "write -P 0x77 1M 64k", fmt="qcow2")
    want = reference_raw(overlay, tmp_path / "want.raw", fmt="qcow2").read_bytes()
    root = await open_image(str(overlay))
    try:
        backing = root.child("backing")
        assert backing is not None and backing.label == name
        assert bytes(await root.pread(0, root.size)) == want
    finally:
        await root.aclose()


async def test_block_status_matches_qemu_img_map(ceph_cluster: Cluster,
                                                 sparse_qcow2: Path, tmp_path: Path) -> None:
    """Runs of data and zeros over the object map (whole 4 MiB objects), as QEMU's rbd
    driver reports them to ``qemu-img map``."""
    raw = reference_raw(sparse_qcow2, tmp_path / "sparse.raw")
    image = _unique("map")
    # --sparse-size 4K: the zero stretches of the file are not written, so whole objects
    # stay absent.
    ceph_cluster.rbd("import", "--sparse-size", "4K", raw, f"rbd/{image}")
    name = ceph_cluster.qemu_name(f"rbd/{image}")
    theirs = [(e["start"], e["length"], e["data"], e["zero"])
              for e in json.loads(qemu_img("map", "--output=json", "-f", "raw", name))]
    node = await _open(name)
    try:
        ours = await status_runs(node)
    finally:
        await node.aclose()
    assert ours == theirs
    assert any(not data for _, _, data, _ in theirs)  # some object was never written


async def test_snapshot_read_only_and_listed(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``@SNAP`` reads the snapshot's content while the head moves on; it cannot be opened
    for writing; ``info`` lists the image's snapshots with QEMU's fields."""
    image = _unique("snap")
    ceph_cluster.rbd("create", "--size", "4M", f"rbd/{image}")
    head = ceph_cluster.qemu_name(f"rbd/{image}")
    snap = ceph_cluster.qemu_name(f"rbd/{image}@before")
    qemu_io(head, "write -P 0x01 0 1M", fmt="raw")
    ceph_cluster.rbd("snap", "create", f"rbd/{image}@before")
    qemu_io(head, "write -P 0x02 0 512k", fmt="raw")
    node = await _open(snap)
    try:
        assert bytes(await node.pread(0, 1 << 20)) == b"\x01" * (1 << 20)
        assert [s["name"] for s in node.info()["snapshots"]] == ["before"]
        assert node.info()["snapshot"] == "before"
    finally:
        await node.aclose()
    with pytest.raises(VdiskError, match="snapshot 'before' is read-only") as info:
        await _open(snap, read_only=False)
    assert info.value.errno == errno.EROFS
    out = run(".venv/bin/python", "-m", "vdiskfs", "info", "--format", "raw", head).stdout
    assert "Snapshot list:" in out and "before" in out
    out = json.loads(run(".venv/bin/python", "-m", "vdiskfs", "info", "--json", "--format",
                         "raw", head).stdout)
    assert [s["name"] for s in out["snapshots"]] == ["before"]


async def test_raw_over_rbd_offers_the_images_snapshots(ceph_cluster: Cluster) -> None:
    """A raw node over an RBD image lists the image's snapshots (QEMU's fallback to the
    protocol) and opens each read-only by position, ID or name, over the image's connection
    (no read cache over either: librbd's); an unknown one is ENOENT listing the ones there."""
    image = _unique("snapview")
    ceph_cluster.rbd("create", "--size", "4M", f"rbd/{image}")
    head = ceph_cluster.qemu_name(f"rbd/{image}")
    qemu_io(head, "write -P 0x01 0 4M", fmt="raw")
    ceph_cluster.rbd("snap", "create", f"rbd/{image}@one")
    ceph_cluster.rbd("resize", "--size", "8M", f"rbd/{image}")
    qemu_io(head, "write -P 0x02 0 8M", fmt="raw")
    ceph_cluster.rbd("snap", "create", f"rbd/{image}@two")
    qemu_io(head, "write -P 0x03 0 1M", fmt="raw")
    root = await open_image(head, OpenOptions(format="raw"))
    try:
        snaps = root.internal_snapshots()
        assert [(s.name, s.size) for s in snaps] == [("one", 4 << 20), ("two", 8 << 20)]
        for key, fill, size in ((0, 0x01, 4 << 20), (snaps[1].id, 0x02, 8 << 20),
                                ("one", 0x01, 4 << 20)):
            view = await root.open_snapshot(key)
            try:
                assert view.read_only and view.size == size
                assert [n.driver for _, _, n in view.walk()] == ["raw", "rbd"]
                assert bytes(await view.pread(0, 4096)) == bytes([fill]) * 4096
                assert view.internal_snapshots() == []
            finally:
                await view.aclose()
        with pytest.raises(VdiskError, match="has no snapshot 'three' \\(it has: one, two\\)"
                           ) as info:
            await root.open_snapshot("three")
        assert info.value.errno == errno.ENOENT
        assert bytes(await root.pread(0, 4096)) == b"\x03" * 4096
    finally:
        await root.aclose()


async def test_second_writer_refused(ceph_cluster: Cluster) -> None:
    """The first writer holds the exclusive lock; a second one (ours, or QEMU's) is refused
    with a message saying so; readers are not."""
    image = _unique("lock")
    ceph_cluster.rbd("create", "--size", "4M", f"rbd/{image}")
    name = ceph_cluster.qemu_name(f"rbd/{image}")
    first = await _open(name, read_only=False)
    try:
        await first.pwrite(0, b"first")
        with pytest.raises(LockedError, match="another client") as info:
            await _open(name, read_only=False)
        assert info.value.errno == errno.EBUSY
        assert info.value.path == name
        reader = await _open(name)
        await reader.aclose()
        qemu = run("qemu-io", "-f", "raw", "-c", "write 0 4k", name, check=False)
        # QEMU opens (it takes no lock at open) but its write fails: the lock stays ours.
        assert "write failed: Read-only file system" in qemu.stdout, qemu.stdout + qemu.stderr
        assert bytes(await first.pread(0, 5)) == b"first"
    finally:
        await first.aclose()
    # The lock went with the first writer: a new one opens.
    again = await _open(name, read_only=False)
    await again.aclose()


@pytest.mark.parametrize(("spec", "message", "err"), [
    ("rbd/missing-image", "no image 'missing-image' in pool 'rbd'", errno.ENOENT),
    ("nopool/img", "no pool 'nopool'", errno.ENOENT),
])
async def test_missing_image_and_pool(ceph_cluster: Cluster, spec: str, message: str,
                                      err: int) -> None:
    name = ceph_cluster.qemu_name(spec)
    with pytest.raises(VdiskError, match=message) as info:
        await _open(name)
    assert info.value.errno == err and info.value.path == name


async def test_missing_snapshot_names_the_ones_there(ceph_cluster: Cluster) -> None:
    image = _unique("nosnap")
    ceph_cluster.rbd("create", "--size", "1M", f"rbd/{image}")
    ceph_cluster.rbd("snap", "create", f"rbd/{image}@one")
    with pytest.raises(VdiskError, match="has no snapshot 'two' \\(it has: one\\)"):
        await _open(ceph_cluster.qemu_name(f"rbd/{image}@two"))


async def test_bad_conf_and_option(ceph_cluster: Cluster, tmp_path: Path) -> None:
    with pytest.raises(VdiskError, match="cannot read conf=") as info:
        await _open(f"rbd:rbd/x:conf={tmp_path / 'none.conf'}")
    assert info.value.field == "conf"
    with pytest.raises(VdiskError, match="bad Ceph option no_such_option='1'") as info:
        await _open(f"{ceph_cluster.qemu_name('rbd/x')}:no_such_option=1")
    assert info.value.field == "no_such_option"


async def test_no_conf_and_no_monitor_address(ceph_cluster: Cluster,
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """No conf=, no ceph.conf where librados looks: the error says what to give. With the
    monitor address and keyring in the name alone, the image opens."""
    monkeypatch.setenv("CEPH_CONF", str(tmp_path / "absent.conf"))
    with pytest.raises(VdiskError, match="no monitor address: give conf=FILE"):
        await _open("rbd:rbd/x")
    image = _unique("noconf")
    ceph_cluster.rbd("create", "--size", "1M", f"rbd/{image}")
    mon_host = ceph_cluster.mon_addr.replace(":", "\\:").replace(",", "\\,")
    node = await _open(f"rbd:rbd/{image}:mon_host={mon_host}:keyring={ceph_cluster.keyring}")
    await node.aclose()


async def test_unreachable_monitor_fails_within_the_timeout(tmp_path: Path,
                                                            ceph_cluster: Cluster) -> None:
    """No monitor answers: a clear error after client_mount_timeout, not a hang."""
    conf = tmp_path / "dead.conf"
    conf.write_text(ceph_cluster.conf.read_text().replace(
        ceph_cluster.mon_addr, "[v2:127.0.0.1:9,v1:127.0.0.1:10]"))
    with pytest.raises(VdiskError, match="cannot reach the cluster's monitors") as info:
        await _open(f"rbd:rbd/x:conf={conf}:client_mount_timeout=2")
    assert info.value.errno == errno.ETIMEDOUT


async def test_image_without_exclusive_lock_opens_with_a_warning(ceph_cluster: Cluster) -> None:
    image = _unique("nolock")
    ceph_cluster.rbd("create", "--size", "1M", "--image-feature", "layering", f"rbd/{image}")
    warnings: list[str] = []
    root = await open_image(ceph_cluster.qemu_name(f"rbd/{image}"),
                            OpenOptions(format="raw", read_only=False, warn=warnings.append))
    try:
        await root.pwrite(0, b"x")
    finally:
        await root.aclose()
    assert any("no exclusive-lock feature" in w for w in warnings)


async def test_cancelled_request_is_abandoned(ceph_cluster: Cluster) -> None:
    """A cancelled read returns at once (librbd cannot stop it); its late completion is
    dropped, and the node goes on serving and closes."""
    image = _unique("cancel")
    ceph_cluster.rbd("create", "--size", "1M", f"rbd/{image}")
    node = await _open(ceph_cluster.qemu_name(f"rbd/{image}"))
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await node.pread(0, 4096)
        assert scope.cancelled_caught
        assert node.counters.abandoned == 1
        assert bytes(await node.pread(0, 4096)) == bytes(4096)
    finally:
        await node.aclose()


@pytest.mark.parametrize("cancelled", [(0,), (0, 1, 2), tuple(range(1, 16, 2))],
                         ids=["collector", "collector-and-successors", "others"])
async def test_cancelled_waiters_leave_the_rest_served(ceph_cluster: Cluster, tmp_path: Path,
                                                       cancelled: tuple[int, ...]) -> None:
    """Of 16 reads in flight, the first task watches librbd's completions for all
    (``RbdNode._wait``); cancelling it, its successors or others leaves every other read
    served with its bytes, and the node serving afterwards."""
    data = random_bytes(16, 1 << 20)
    source = tmp_path / "source.raw"
    source.write_bytes(data)
    image = _unique("takeover")
    ceph_cluster.rbd("import", source, f"rbd/{image}")
    node = await _open(ceph_cluster.qemu_name(f"rbd/{image}"))
    try:
        got: dict[int, bytes] = {}
        scopes = [trio.CancelScope() for _ in range(16)]

        async def read(i: int) -> None:
            with scopes[i]:
                got[i] = bytes(await node.pread(i * 65536, 4096))

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(read, i)
            await trio.testing.wait_all_tasks_blocked()
            for i in cancelled:
                scopes[i].cancel()
        for i, block in got.items():
            assert block == data[i * 65536 : i * 65536 + 4096], f"read {i}"
        assert set(range(16)) - set(cancelled) <= set(got)
        assert not node._waiting and not node._collecting
        assert bytes(await node.pread(65536, 4096)) == data[65536 : 65536 + 4096]
    finally:
        await node.aclose()


def _wait_all_threads_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of ``pid`` is in the stopped state (``T`` in /proc/PID/task/*/stat)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for stat_file in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                states.append(stat_file.read_text().rpartition(")")[2].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.01)


async def test_stopped_osd_gives_an_error_then_reads_resume(ceph_cluster: Cluster) -> None:
    """The OSD stopped (SIGSTOP) under a reader: the read fails with ETIMEDOUT after
    rados_osd_op_timeout, never a hang or wrong bytes; once it runs again, reads resume."""
    image = _unique("stopped")
    ceph_cluster.rbd("create", "--size", "4M", f"rbd/{image}")
    data = random_bytes(13, 4 << 20)
    name = f"{ceph_cluster.qemu_name(f'rbd/{image}')}:rados_osd_op_timeout=2:rbd_cache=false"
    node = await _open(name, read_only=False)
    osd = ceph_cluster.processes["osd.0"]
    try:
        await node.pwrite(0, data)
        osd.send_signal(signal.SIGSTOP)
        try:
            # SIGSTOP takes effect thread by thread: a read sent before every OSD thread has
            # stopped can still be answered (CI saw one), so wait for the whole group.
            _wait_all_threads_stopped(osd.pid)
            with pytest.raises(VdiskError) as info:
                await node.pread(1 << 20, 4096)
            assert info.value.errno == errno.ETIMEDOUT
            assert image in str(info.value)
        finally:
            osd.send_signal(signal.SIGCONT)
        # Reads resume: right bytes. The OSD just woken on a loaded machine may itself take
        # longer than the 2 s timeout at first, so a timed-out read is tried again.
        for attempt in range(3):
            try:
                assert bytes(await node.pread(0, 4 << 20)) == data
                break
            except VdiskError as exc:
                if exc.errno != errno.ETIMEDOUT or attempt == 2:
                    raise
    finally:
        await node.aclose()


async def test_namespace(ceph_cluster: Cluster) -> None:
    """``rbd:POOL/NAMESPACE/IMAGE``: the image of that name in the namespace, not the pool's."""
    ceph_cluster.rbd("namespace", "create", "rbd/tenant")
    ceph_cluster.rbd("create", "--size", "1M", "rbd/tenant/shared-name")
    ceph_cluster.rbd("create", "--size", "2M", "rbd/shared-name")
    node = await _open(ceph_cluster.qemu_name("rbd/tenant/shared-name"))
    try:
        assert node.size == 1 << 20
        assert node.info()["namespace"] == "tenant"
    finally:
        await node.aclose()


async def test_user_and_keyring(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """``id=`` and ``keyring=``: a read-only cephx user reads; its write is refused by the
    cluster with the errno kept and the image named."""
    image = _unique("reader")
    ceph_cluster.rbd("create", "--size", "1M", f"rbd/{image}")
    keyring = tmp_path / "reader.keyring"
    run("ceph", "-c", ceph_cluster.conf, "auth", "get-or-create", "client.reader", "mon",
        "profile rbd", "osd", "profile rbd-read-only pool=rbd", "-o", keyring)
    name = f"{ceph_cluster.qemu_name(f'rbd/{image}')}:id=reader:keyring={keyring}"
    node = await _open(name)
    try:
        assert bytes(await node.pread(0, 4096)) == bytes(4096)
    finally:
        await node.aclose()
    with pytest.raises(VdiskError) as info:
        writer = await _open(name, read_only=False)
        try:
            await writer.pwrite(0, b"x")
            await writer.flush()
        finally:
            await writer.aclose()
    assert info.value.errno in (errno.EPERM, errno.EACCES)
    assert info.value.path == name


async def test_backing_names_inside_an_rbd_image(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """A qcow2 stored in RBD follows a full rbd: backing name; a relative name has no
    directory to resolve against and is refused, naming the field."""
    base_data = random_bytes(17, 1 << 20)
    raw = tmp_path / "base.raw"
    raw.write_bytes(base_data)
    base = _unique("chain-base")
    ceph_cluster.rbd("import", raw, f"rbd/{base}")
    good = create(tmp_path / "good.qcow2", "1M", backing=ceph_cluster.qemu_name(f"rbd/{base}"),
                  backing_fmt="raw")
    bad = create(tmp_path / "bad.qcow2", "1M", backing="base.raw", backing_fmt="raw")
    for source in (good, bad):
        ceph_cluster.rbd("import", source, f"rbd/{source.stem}-{base}")
    root = await open_image(ceph_cluster.qemu_name(f"rbd/good-{base}"))
    try:
        assert bytes(await root.pread(0, 1 << 20)) == base_data
    finally:
        await root.aclose()
    with pytest.raises(VdiskError, match="must be a full rbd: or nbd:// name") as info:
        await open_image(ceph_cluster.qemu_name(f"rbd/bad-{base}"))
    assert info.value.field is not None
    with pytest.raises(VdiskError, match="no-follow-outside"):
        await open_image(ceph_cluster.qemu_name(f"rbd/good-{base}"),
                         OpenOptions(follow_outside=False))
