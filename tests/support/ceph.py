"""A throwaway Ceph cluster for the ``ceph`` tests, from Debian's packages (pacific).

:func:`start_cluster` brings up one monitor and one OSD on ``memstore`` under a temporary
directory, on 127.0.0.1 with free ports, cephx on, every pool of size 1; then creates the
pool ``rbd`` and initialises it for RBD. No mgr: RBD, RADOS and radosgw do not need one (only
``ceph -s`` figures and a ``MGR_DOWN`` warning miss it). :func:`start_radosgw` adds a radosgw
for the S3 tests (a user ``test`` with fixed keys), on demand: about 1 s more, 150 MB for the
three daemons.

Everything comes from one conf file passed explicitly (``Cluster.conf``: ``CEPH_CONF``,
``rbd:pool/img:conf=FILE`` for QEMU and vdiskfs); there is no ``/etc/ceph`` and no system
service. One keyring, made here without ``ceph-authtool`` (a cephx secret is 16 random bytes
in a small header), holds ``mon.``, ``client.admin``, ``osd.0`` and ``client.rgw.test`` with
their caps; ``ceph-mon --mkfs`` imports it, so no ``ceph auth`` call is needed later.

Measured on the 2-core test machine (load average 3, other work running), three starts:
from nothing to a pool that serves I/O 0.85-0.87 s (``Cluster.start_seconds``); the two
daemons idle at 78 MiB RSS together (``Cluster.rss_bytes()``), 207 MiB after 64 MiB written
(memstore keeps the data in RAM, about 2x its size, and does not give it back after deletes);
teardown under 0.1 s. ``paxos propose interval = 0.05`` matters: at the default 1 s every
monitor write waits a second and start-up takes 7-18 s.

A memstore OSD does not survive a restart, so a cluster is never restarted: teardown SIGKILLs
the daemons (about 1 s; a graceful stop waits about 6 s) and the next session makes a new one.
Daemons get their stdio from/to ``/dev/null`` (a caller reading their pipe would wait for
ever) and die with the test process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.http_server import free_port

__all__ = ["PACKAGES", "Cluster", "available", "start_cluster", "start_radosgw"]

#: What the ceph tests need installed (scripts/setup.sh installs them).
PACKAGES = "ceph-mon ceph-osd ceph-common python3-rados python3-rbd qemu-block-extra"

#: The pool that :func:`start_cluster` creates and initialises for RBD.
POOL = "rbd"
#: The radosgw user's S3 keys (a throwaway cluster: fixed, so that tests can use them).
RGW_ACCESS_KEY = "VDISKFSTESTACCESSKEY"
RGW_SECRET_KEY = "vdiskfs-test-secret-key-0123456789abcdef"

_CAPS = {
    "mon.": {"mon": "allow *"},
    "client.admin": {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"},
    "osd.0": {"mon": "allow profile osd", "osd": "allow *", "mgr": "allow profile osd"},
    "client.rgw.test": {"mon": "allow rw", "osd": "allow rwx"},
}


def available() -> str | None:
    """None when the cluster can be started here, else why not (a skip reason)."""
    for tool in ("ceph-mon", "ceph-osd", "monmaptool", "rbd", "qemu-img"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup.sh installs {PACKAGES})"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return "needs python3-rados and python3-rbd in the venv (scripts/setup.sh)"
    if not any(Path("/usr/lib").glob("*/qemu/block-rbd.so")):
        return "needs QEMU's rbd driver (scripts/setup.sh installs qemu-block-extra)"
    return None


def _secret() -> str:
    """A cephx key as keyrings spell it: CryptoKey's encoding (type 1 = AES, creation time,
    length) and 16 random bytes, in base64."""
    now = time.time()
    raw = os.urandom(16)
    return base64.b64encode(struct.pack("<HIIH", 1, int(now), 0, len(raw)) + raw).decode()


def _keyring() -> str:
    lines = []
    for name, caps in _CAPS.items():
        lines += [f"[{name}]", f"\tkey = {_secret()}"]
        lines += [f'\tcaps {what} = "{cap}"' for what, cap in caps.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Cluster:
    """A running cluster. ``conf`` is all a client needs (it names the keyring; the default
    user is ``client.admin``)."""

    directory: Path
    conf: Path
    keyring: Path
    mon_addr: str
    start_seconds: float
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: radosgw's S3 endpoint once :func:`start_radosgw` ran.
    rgw_endpoint: str | None = None

    def env(self) -> dict[str, str]:
        """The environment for the ``ceph``/``rbd``/``rados`` tools against this cluster."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def rbd(self, *args: str | Path) -> str:
        """Run the ``rbd`` tool (``rbd("import", src, "rbd/img")``); its stdout."""
        return subprocess.run(["rbd", *map(str, args)], env=self.env(), check=True,
                              capture_output=True, text=True, timeout=120).stdout

    def qemu_name(self, image: str) -> str:
        """``rbd:POOL/IMAGE:conf=FILE``, the name QEMU and vdiskfs open ``POOL/IMAGE`` by."""
        return f"rbd:{image}:conf={self.conf}"

    def rss_bytes(self) -> int:
        """Resident memory of the daemons, summed."""
        total = 0
        for proc in self.processes.values():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def stop(self) -> None:
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        for proc in self.processes.values():
            proc.wait()
        self.processes.clear()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process dies without its
    # teardown (killed), the daemons do not outlive it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(cluster: Cluster, name: str, argv: list[str]) -> None:
    cluster.processes[name] = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent)


def _run(argv: list[str], cluster_dir: Path) -> None:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr.strip()[-2000:]} (logs in {cluster_dir}/log)")


def _config(d: Path, fsid: str, mon_addr: str) -> str:
    return f"""[global]
fsid = {fsid}
mon host = {mon_addr}
mon initial members = a
public addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
log to stderr = false
err to stderr = false
mon data = {d}/mon/$cluster-$id
# The monitor refuses to start below 5% free space on its file system (14 GiB of this machine's
# disk, which the tests' images fill that far when two workers run): it keeps little here.
mon data avail crit = 0
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 2147483648
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
paxos propose interval = 0.05
mon osd reporter subtree level = osd
rbd default features = layering, exclusive-lock, object-map, fast-diff, deep-flatten

[client.rgw.test]
rgw frontends = beast endpoint=127.0.0.1:{{rgw_port}} tcp_nodelay=1
rgw data = {d}/rgw
log file = {d}/log/$name.log
"""


@contextlib.contextmanager
def _admin(cluster: Cluster, timeout: float = 30) -> Iterator[object]:
    import rados

    client = rados.Rados(conffile=str(cluster.conf), name="client.admin")
    try:
        client.connect(timeout=int(timeout))
        yield client
    finally:
        client.shutdown()


def _mon_command(client: object, timeout: float, **command: object) -> bytes:
    ret, out, err = client.mon_command(json.dumps(command), b"", timeout=int(timeout))  # type: ignore[attr-defined]
    if ret != 0:
        raise RuntimeError(f"mon command {command}: {err} ({ret})")
    return out


@contextlib.contextmanager
def start_cluster(directory: Path, *, timeout: float = 60) -> Iterator[Cluster]:
    """A running cluster under ``directory`` with the pool ``rbd`` ready; torn down after."""
    import rados
    import rbd

    started = time.monotonic()
    d = directory
    for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    fsid = str(uuid.uuid4())
    mon_addr = f"[v2:127.0.0.1:{free_port()},v1:127.0.0.1:{free_port()}]"
    conf, keyring = d / "ceph.conf", d / "keyring"
    conf.write_text(_config(d, fsid, mon_addr).replace("{rgw_port}", str(free_port())))
    keyring.write_text(_keyring())
    cluster = Cluster(d, conf, keyring, mon_addr, 0.0)
    try:
        _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr,
              str(d / "monmap")], d)
        _run(["ceph-mon", "-c", str(conf), "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
              "--keyring", str(keyring)], d)
        _spawn(cluster, "mon.a", ["ceph-mon", "-c", str(conf), "-i", "a", "-f"])
        osd_uuid = str(uuid.uuid4())
        _run(["ceph-osd", "-c", str(conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], d)
        with _admin(cluster, timeout) as client:
            _mon_command(client, timeout, prefix="osd new", uuid=osd_uuid, id=0)
            _spawn(cluster, "osd.0", ["ceph-osd", "-c", str(conf), "-i", "0", "-f"])
            _mon_command(client, timeout, prefix="osd pool create", pool=POOL, pg_num=8)
            _mon_command(client, timeout, prefix="osd pool application enable", pool=POOL,
                         app="rbd")
            with client.open_ioctx(POOL) as ioctx:  # type: ignore[attr-defined]
                # The first write waits until the OSD is up and the pool's PGs are active:
                # when it returns, the cluster serves I/O.
                rbd.RBD().pool_init(ioctx, False)
                ioctx.write_full("vdiskfs-ready", b"ready")
        cluster.start_seconds = time.monotonic() - started
        yield cluster
    except rados.Error as exc:
        raise RuntimeError(f"the test cluster did not start: {exc} (logs in {d}/log)") from exc
    finally:
        cluster.stop()


def start_radosgw(cluster: Cluster, *, timeout: float = 30) -> str:
    """Start a radosgw on the cluster (for the S3 tests) and create the user ``test`` with
    :data:`RGW_ACCESS_KEY`/:data:`RGW_SECRET_KEY`; its endpoint URL. It stops with the
    cluster. Costs about 1 s more and some 40 MB."""
    if cluster.rgw_endpoint is not None:
        return cluster.rgw_endpoint
    port = None
    for line in cluster.conf.read_text().splitlines():
        if line.startswith("rgw frontends"):
            port = int(line.split("endpoint=127.0.0.1:")[1].split()[0])
    assert port is not None
    _spawn(cluster, "client.rgw.test", ["radosgw", "-c", str(cluster.conf), "-n",
                                        "client.rgw.test", "-f"])
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"radosgw did not start (logs in {cluster.directory}/log)"
                                   ) from None
            time.sleep(0.05)
    _run(["radosgw-admin", "-c", str(cluster.conf), "user", "create", "--uid=test",
          "--display-name=test", f"--access-key={RGW_ACCESS_KEY}", f"--secret={RGW_SECRET_KEY}"],
         cluster.directory)
    cluster.rgw_endpoint = f"http://127.0.0.1:{port}"
    return cluster.rgw_endpoint
