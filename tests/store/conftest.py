"""Fixtures for the store tests: small base vDisk files with known content."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.store.helpers import MakeBase, pattern


@pytest.fixture
def make_base(tmp_path: Path) -> MakeBase:
    def make(size: int, name: str = "base.vhd", seed: int = 1) -> Path:
        path = tmp_path / name
        path.write_bytes(pattern(size, seed))
        return path

    return make
