from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from pvsfarm.cli import cli
from pvsfarm.commands import register
from pvsfarm.db.engine import make_engine
from pvsfarm.db.models import Base

register(cli)

Invoke = Callable[..., Result]


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Invoke:
    """Run ``pvsfarm --db URL --data-dir TMP ...`` in-process; PostgreSQL is upgraded first."""
    runner = CliRunner()
    data_dir = tmp_path / "data"

    def invoke(*args: str) -> Result:
        return runner.invoke(cli, ["--db", db_url, "--data-dir", str(data_dir), *args], catch_exceptions=False)

    result = invoke("db", "upgrade")
    assert result.exit_code == 0, result.output
    return invoke


def snapshot(db_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, for before/after comparisons."""
    engine = make_engine(db_url)
    out: dict[str, list[tuple[object, ...]]] = {}
    with engine.connect() as conn:
        for name, table in Base.metadata.tables.items():
            out[name] = sorted((tuple(r) for r in conn.execute(select(table))), key=repr)
    engine.dispose()
    return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(range(256)) * 2 * 64)  # 32 KiB
    return path
