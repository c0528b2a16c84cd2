"""Alembic upgrade from empty to head, on SQLite and PostgreSQL; models == migrations."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from pvsfarm.db import migrate
from pvsfarm.db.engine import make_engine
from pvsfarm.db.models import Base


def test_upgrade_empty_to_head_and_models_agree(db_url: str) -> None:
    engine = make_engine(db_url)
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision(engine)
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    migrate.upgrade(engine)  # idempotent
    engine.dispose()


def test_every_constraint_is_named(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    insp = inspect(engine)
    for table in Base.metadata.tables:
        for uq in insp.get_unique_constraints(table):
            assert uq["name"], f"unnamed unique constraint on {table}"
        for fk in insp.get_foreign_keys(table):
            assert fk["name"], f"unnamed foreign key on {table}"
    engine.dispose()
