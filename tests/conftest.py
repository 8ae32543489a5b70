"""Shared fixtures. Images are built per test session with the reference tools."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ceph import RGW_ACCESS_KEY, RGW_SECRET_KEY, Cluster, start_cluster, start_radosgw
from tests.support.ceph import available as ceph_available
from tests.support.concurrency import build_templates
from tests.support.http_server import Nginx, start_nginx
from tests.support.s3 import S3Store


def _can_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _can_mount():
        return
    skip = pytest.mark.skip(reason="needs root, /dev/fuse and fusermount3")
    for item in items:
        if "mount" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def variant_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small pre-filled image of every writable format (tests.support.concurrency)."""
    return build_templates(tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx on 127.0.0.1 over HTTP and HTTPS (tests.support.http_server); tests put the files
    they serve under ``nginx.root``."""
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("needs nginx (scripts/setup.sh installs nginx-light)")
    with start_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A throwaway Ceph cluster (tests.support.ceph): one mon, one memstore OSD, the pool
    ``rbd``; for tests marked ``ceph``. Started once per session (about 1-2 s)."""
    reason = ceph_available()
    if reason is not None:
        pytest.skip(reason)
    with start_cluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_store(ceph_cluster: Cluster) -> S3Store:
    """A radosgw on the test cluster (started by the first test that asks, about 1.5 s more),
    its user ``test`` and the bucket ``vdiskfs``; for the s3 tests, marked ``ceph``."""
    store = S3Store(start_radosgw(ceph_cluster), RGW_ACCESS_KEY, RGW_SECRET_KEY, "vdiskfs")
    store.create_bucket(store.bucket)
    return store
