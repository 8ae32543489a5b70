"""Partitioned disks built once per session with the reference tools."""

from __future__ import annotations

import pytest

from tests.support.partitioned import (
    PartitionedDisk,
    make_gpt_4k_disk,
    make_gpt_disk,
    make_mbr_4k_disk,
    make_mbr_disk,
    make_sgdisk_gpt_disk,
)


@pytest.fixture(scope="session")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> PartitionedDisk:
    return make_gpt_disk(tmp_path_factory.mktemp("gpt"))


@pytest.fixture(scope="session")
def sgdisk_disk(tmp_path_factory: pytest.TempPathFactory) -> PartitionedDisk:
    return make_sgdisk_gpt_disk(tmp_path_factory.mktemp("sgdisk"))


@pytest.fixture(scope="session")
def gpt_4k_disk(tmp_path_factory: pytest.TempPathFactory) -> PartitionedDisk:
    return make_gpt_4k_disk(tmp_path_factory.mktemp("gpt4k"))


@pytest.fixture(scope="session")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> PartitionedDisk:
    return make_mbr_disk(tmp_path_factory.mktemp("mbr"))


@pytest.fixture(scope="session")
def mbr_4k_disk(tmp_path_factory: pytest.TempPathFactory) -> PartitionedDisk:
    return make_mbr_4k_disk(tmp_path_factory.mktemp("mbr4k"))
