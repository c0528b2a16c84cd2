"""The ``pvsfarm`` command: one root group; each command parses, calls one
service function inside a transaction, and prints. Every `PvsfarmError`
becomes one line on stderr and exit status 1 (here, in one place)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pvsfarm.app import App
from pvsfarm.config import load_config
from pvsfarm.db.engine import session_scope
from pvsfarm.errors import PvsfarmError

T = TypeVar("T")


class FarmGroup(click.Group):
    """Maps domain errors to a one-line message and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PvsfarmError as exc:
            click.echo(f"pvsfarm: error: {exc}", err=True)
            sys.exit(1)
        except SQLAlchemyError as exc:
            first = str(exc).strip().splitlines()[0]
            click.echo(f"pvsfarm: database error: {first}", err=True)
            sys.exit(1)


class Obj:
    """Lazily builds the App the first time a command needs it."""

    def __init__(self, db: str | None, config: str | None, data_dir: str | None) -> None:
        self.db, self.config_path, self.data_dir = db, config, data_dir
        self._app: App | None = None

    @property
    def app(self) -> App:
        if self._app is None:
            cfg = load_config(self.config_path)
            if self.data_dir:
                import dataclasses

                cfg = dataclasses.replace(cfg, data_dir=self.data_dir)
            self._app = App(config=cfg, db_url=self.db or cfg.db_url)
        return self._app


@contextmanager
def transaction(ctx: click.Context) -> Iterator[Session]:
    app = ctx.find_object(Obj).app  # type: ignore[union-attr]
    with session_scope(app.sessions()) as session:
        yield session


def run(ctx: click.Context, fn: Callable[[Session], T]) -> T:
    with transaction(ctx) as session:
        return fn(session)


def app_of(ctx: click.Context) -> App:
    return ctx.find_object(Obj).app  # type: ignore[union-attr]


@click.group(cls=FarmGroup)
@click.option("--db", "db", metavar="URL", envvar="PVSFARM_DB", help="Database URL (postgresql+psycopg2://...).")
@click.option("--config", "config", metavar="FILE", envvar="PVSFARM_CONFIG", type=click.Path(dir_okay=False),
              help="Node configuration YAML.")
@click.option("--data-dir", metavar="DIR", envvar="PVSFARM_DATA_DIR", help="Data directory (embedded default).")
@click.version_option(package_name="pvsfarm")
@click.pass_context
def cli(ctx: click.Context, db: str | None, config: str | None, data_dir: str | None) -> None:
    """pvsfarm: a highly available network-boot streaming farm."""
    ctx.obj = Obj(db, config, data_dir)


def main() -> None:
    from pvsfarm.commands import register

    register(cli)
    cli(prog_name="pvsfarm")


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)


def path_arg(value: str) -> Path:
    return Path(value)
