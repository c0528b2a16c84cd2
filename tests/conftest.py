"""Shared fixtures: a throwaway PostgreSQL per test session, databases per test,
and the ``db_url`` fixture that runs a test on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pytest_postgresql import factories

ROOT = Path(__file__).resolve().parent.parent
PG_CTL = ROOT / "tools" / "pg_ctl_as_postgres"

postgresql_proc = factories.postgresql_proc(executable=str(PG_CTL), host="127.0.0.1", port=None)

_counter = itertools.count()


@pytest.fixture
def pg_url(postgresql_proc) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh, empty PostgreSQL database on the session's throwaway cluster."""
    name = f"pvsfarm_t{os.getpid()}_{next(_counter)}"
    dsn = f"host={postgresql_proc.host} port={postgresql_proc.port} user={postgresql_proc.user} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg2://{postgresql_proc.user}@{postgresql_proc.host}:{postgresql_proc.port}/{name}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'farm.sqlite'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on the embedded SQLite default and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'farm.sqlite'}"
    return request.getfixturevalue("pg_url")


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None
