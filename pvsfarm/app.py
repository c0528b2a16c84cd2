"""The application object: configuration, database engine and session factory.

Built lazily by the CLI (in ``ctx.obj``) and by the node. The embedded SQLite
default upgrades its own schema on first use; PostgreSQL must be upgraded
explicitly with ``pvsfarm db upgrade``.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from pvsfarm.config import NodeConfig
from pvsfarm.db import migrate
from pvsfarm.db.engine import check_reachable, has_schema, make_engine
from pvsfarm.errors import ConfigError


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class App:
    config: NodeConfig
    db_url: str
    actor: str = field(default_factory=default_actor)
    _engine: Engine | None = None
    _factory: sessionmaker[Session] | None = None

    @property
    def is_embedded(self) -> bool:
        return make_url(self.db_url).get_backend_name() == "sqlite"

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.db_url)
        return self._engine

    def sessions(self, *, require_schema: bool = True) -> sessionmaker[Session]:
        """The session factory, after checking the database is reachable and at head."""
        if self._factory is None:
            check_reachable(self.engine)
            if require_schema:
                self._ensure_schema()
            self._factory = sessionmaker(self.engine, expire_on_commit=False)
        return self._factory

    def _ensure_schema(self) -> None:
        if self.is_embedded:
            if migrate.current_revision(self.engine) != migrate.head_revision(self.engine):
                migrate.upgrade(self.engine)
            return
        if not has_schema(self.engine) or migrate.current_revision(self.engine) != migrate.head_revision(
            self.engine
        ):
            raise ConfigError("database schema is not at the current version: run `pvsfarm db upgrade`")

    def upgrade(self) -> str | None:
        check_reachable(self.engine)
        migrate.upgrade(self.engine)
        return migrate.current_revision(self.engine)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
