"""QEMU's ``rbd:`` names, parsed without a cluster; and vdiskfs without librbd's binding."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vdiskfs.block.registry import is_network_name, url_scheme
from vdiskfs.drivers.protocol.rbd.spec import RbdSpec, parse_spec
from vdiskfs.errors import VdiskError


@pytest.mark.parametrize(("name", "spec"), [
    ("rbd:pool/img", RbdSpec(pool="pool", image="img")),
    ("rbd:pool/img@snap", RbdSpec(pool="pool", image="img", snapshot="snap")),
    ("rbd:pool/ns/img", RbdSpec(pool="pool", image="img", namespace="ns")),
    ("rbd:pool/ns/img@s1:conf=/etc/c.conf",
     RbdSpec(pool="pool", image="img", namespace="ns", snapshot="s1", conf="/etc/c.conf")),
    ("rbd:p/i:conf=/c:id=alice:keyring=/k",
     RbdSpec(pool="p", image="i", conf="/c", user="alice", keyring="/k")),
    ("rbd:p/i:mon_host=127.0.0.1\\:6789:rbd_cache=false",
     RbdSpec(pool="p", image="i", options=(("mon_host", "127.0.0.1:6789"),
                                          ("rbd_cache", "false")))),
    # A backslash escapes the delimiters, as QEMU's qemu_rbd_next_tok.
    ("rbd:p/a\\:b\\@c", RbdSpec(pool="p", image="a:b@c")),
    ("rbd:p/i:conf=/dir\\:x/c.conf", RbdSpec(pool="p", image="i", conf="/dir:x/c.conf")),
])
def test_parse(name: str, spec: RbdSpec) -> None:
    assert parse_spec(name) == spec


@pytest.mark.parametrize(("name", "message"), [
    ("rbd:pool", "no image"),
    ("rbd:/img", "empty pool"),
    ("rbd:pool/", "empty image"),
    ("rbd:pool/img@", "empty snapshot"),
    ("rbd:pool/img:conf", "has no value"),
    ("rbd:pool/img:key=AQBsecret==", "keyring=FILE"),
    ("rbd:pool/img:conf=/a:conf=/b", "given twice"),
    ("rbd:pool/img:conf=", "empty conf"),
    ("rbd:a/b/c/d", "too many /"),
    ("rbd:pool/img:snapshot=x", "not an option"),
])
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(VdiskError, match=message) as info:
        parse_spec(name)
    assert info.value.path == name


def test_stem_and_where() -> None:
    assert parse_spec("rbd:p/vm:conf=/c").stem == "vm"
    assert parse_spec("rbd:p/ns/vm@before:conf=/c").stem == "vm@before"
    assert parse_spec("rbd:p/ns/vm@before").where == "p/ns/vm@before"


def test_registry_knows_rbd_names() -> None:
    assert url_scheme("rbd:p/i") == "rbd"
    assert is_network_name("rbd:p/i:conf=/c")
    for local in ("./rbd:p/i", "/x/rbd:p/i", "RBD:p/i", "disk.qcow2"):
        assert url_scheme(local) is None


def test_boot_disk_takes_an_rbd_name() -> None:
    from emulator.cli import parse_disk

    disk = parse_disk("rbd:vms/deb:conf=/etc/ceph/c.conf,format=qcow2")
    assert (disk.path, disk.format) == ("rbd:vms/deb:conf=/etc/ceph/c.conf", "qcow2")


def test_without_the_binding_a_clear_error() -> None:
    """No python3-rbd: vdiskfs imports and works, and an rbd: name says what is missing."""
    code = (
        "import sys\n"
        "sys.modules['rbd'] = sys.modules['rados'] = None  # as if not installed\n"
        "from vdiskfs.cli import main\n"
        "sys.exit(main(['info', 'rbd:pool/img']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "rbd: needs python3-rbd" in proc.stderr
    assert "Traceback" not in proc.stderr
