"""Fixtures of the driver tests that span every format."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.concurrency import build_templates


@pytest.fixture(scope="session")
def variant_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small pre-filled image of every writable format (tests.support.concurrency)."""
    return build_templates(tmp_path_factory.mktemp("variants"))
