"""Issued boot ISOs: recorded with their bootstrap, stale in `bootstrap show`, audited when servers leave."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from pvsfarm.admin import farm, media
from pvsfarm.admin.audit import Limits, audit
from pvsfarm.admin.audit_gather import gather_facts
from pvsfarm.cli import cli
from pvsfarm.commands import register
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import Server
from pvsfarm.views import BootstrapMode
from tests.admin.farm_builder import ACTOR, build_healthy, server, sessions  # noqa: F401

register(cli)


def test_issue_records_and_goes_stale(sessions: sessionmaker[Session], tmp_path: Path) -> None:  # noqa: F811
    build_healthy(sessions)
    with session_scope(sessions) as s:
        row = media.issue_iso(s, ACTOR, tmp_path / "boot.iso")
    assert row["bootstrap_version"] == 1 and row["servers"] == ["a", "b"] and row["stale"] is False
    assert (tmp_path / "boot.iso").stat().st_size == row["size_bytes"]
    with session_scope(sessions) as s:
        assert media.media_status(s)["issued_media"] == "1 issued, all built from the current bootstrap"
        farm.configure_bootstrap(s, ACTOR, ["b", "a"], None, None)
    with session_scope(sessions) as s:
        status = media.media_status(s)
    assert "1 of 1 STALE: #1 (v1, listed)" in status["issued_media"]
    assert status["media"][0]["stale"] is True


def test_live_iso_lists_every_server_and_audit_flags_removed_ones(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:  # noqa: F811
    build_healthy(sessions)
    with session_scope(sessions) as s:
        farm.configure_bootstrap(s, ACTOR, ["a", "b"], None, BootstrapMode.LIVE)
        row = media.issue_iso(s, ACTOR, tmp_path / "live.iso")
    assert row["mode"] == "live" and row["servers"] == ["a", "b", "c"]
    with session_scope(sessions) as s:
        s.execute(delete(Server).where(Server.id == server(s, "c").id))
    with session_scope(sessions) as s:
        found = audit(gather_facts(s, Limits(dead_after_s=30.0), standby=True))
    assert [(f.check, f.object, f.severity.value) for f in found] == [("issued-media", "iso #1", "warning")]
    assert "c" in found[0].finding


def test_cli_iso_and_show(db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()

    def pvsfarm(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(cli, ["--db", db_url, "--data-dir", str(tmp_path / "d"), *args], catch_exceptions=False)

    assert pvsfarm("db", "upgrade").exit_code == 0
    assert pvsfarm("bootstrap", "iso", "--out", str(tmp_path / "x.iso")).exit_code == 1  # no bootstrap yet
    for name in ("a", "b"):
        assert pvsfarm("server", "add", name, "--address", f"10.0.0.{len(name)}").exit_code == 0
    assert pvsfarm("bootstrap", "configure", "--server", "a", "--server", "b").exit_code == 0
    out = pvsfarm("bootstrap", "iso", "--out", str(tmp_path / "boot.iso"))
    assert out.exit_code == 0, out.output
    assert "bootstrap v1, listed mode: a, b" in out.output and "ISO #1" in out.output
    assert pvsfarm("bootstrap", "configure", "--server", "b").exit_code == 0
    shown = json.loads(pvsfarm("bootstrap", "show", "--json").output)
    assert shown["version"] == 2 and shown["media"][0]["stale"] is True
    assert "STALE" in pvsfarm("bootstrap", "show").output
