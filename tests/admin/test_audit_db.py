"""`pvsfarm audit` over a farm built in the database, on SQLite and PostgreSQL:
each fault in turn is named exactly; a healthy farm gives a clean report."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from pvsfarm.admin import farm
from pvsfarm.admin.audit import Limits, audit
from pvsfarm.admin.audit_gather import gather_facts, pg_standby, run_audit
from pvsfarm.cli import cli
from pvsfarm.commands import register
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import IssuedMedia, VDiskCopy, utcnow
from pvsfarm.views import BootstrapMode, CopyState
from tests.admin.farm_builder import ACTOR, DIGEST, build_healthy, heartbeat_all, server, sessions  # noqa: F401

register(cli)
LIMITS = Limits(dead_after_s=30.0)
"""Generous: on a loaded CI machine a test must not see its own fresh heartbeats go dead."""


def findings(factory: sessionmaker[Session], standby: bool | None = True) -> set[tuple[str, str]]:
    with session_scope(factory) as s:
        return {(f.check, f.object) for f in audit(gather_facts(s, LIMITS, standby=standby))}


def test_healthy_farm_is_clean(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    build_healthy(sessions)
    assert findings(sessions) == set()
    with session_scope(sessions) as s:
        report = run_audit(s, LIMITS, standby=True)
    assert report == {"severe": False, "counts": {"critical": 0, "warning": 0, "advice": 0}, "findings": []}


def _copy(s: Session, name: str, state: CopyState) -> None:
    s.add(VDiskCopy(vdisk_id=s.scalar(select(VDiskCopy.vdisk_id)), server_id=server(s, name).id,
                    path="/store/win.img", digest="sha256:old", state=state))


def _drop_copy(s: Session, name: str) -> None:
    s.execute(delete(VDiskCopy).where(VDiskCopy.server_id == server(s, name).id))


def _set(name: str, **values: object) -> Callable[[Session], None]:
    def apply(s: Session) -> None:
        for key, value in values.items():
            setattr(server(s, name), key, value)
    return apply


def _media(s: Session) -> None:
    s.add(IssuedMedia(kind="iso", bootstrap_version=1, mode=BootstrapMode.LISTED, servers=json.dumps(["a", "old"]),
                      digest=DIGEST, path="/tmp/boot.iso", actor=ACTOR))


FAULTS: dict[str, tuple[Callable[[Session], None], set[tuple[str, str]]]] = {
    "dead bootstrap server": (_set("b", heartbeat_at=utcnow() - dt.timedelta(minutes=5)),
                              {("bootstrap-dead", "server b")}),
    "drained bootstrap server": (lambda s: farm.set_drain(s, ACTOR, "b", True), {("bootstrap-drained", "server b")}),
    "bootstrap of one": (lambda s: farm.configure_bootstrap(s, ACTOR, ["a"], None, None),
                         {("bootstrap-size", "bootstrap v2")}),
    "single copy": (lambda s: _drop_copy(s, "b"), {("vdisk-copies", "vdisk win"), ("bootstrap-copies", "server b")}),
    "stale copy": (lambda s: _copy(s, "c", CopyState.STALE), {("vdisk-stale", "vdisk win on c")}),
    "dhcp on one node": (lambda s: (_set("b", dhcp_subnet=None)(s), _set("c", dhcp_subnet=None)(s)),
                         {("dhcp-redundancy", "collection lab")}),
    "reservations differ": (lambda s: _set("c", inventory_generation=server(s, "c").inventory_generation - 1)(s),
                            {("dhcp-reservations", "server c")}),
    "unhealthy with dhcp": (_set("c", health="tftp down: timeout"), {("health-dhcp", "server c")}),
    "offline cache missing": (_set("c", offline_cache_at=None), {("offline-cache", "server c")}),
    "offline cache old": (_set("c", offline_cache_at=utcnow() - dt.timedelta(hours=1)), {("offline-cache", "server c")}),
    "local write cache": (_set("a", store_shared=False), {("write-cache-local", "vdisk win")}),
    "iso lists a removed server": (_media, {("issued-media", "iso #1")}),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_named_exactly(sessions: sessionmaker[Session], fault: str) -> None:  # noqa: F811
    build_healthy(sessions)
    apply, expected = FAULTS[fault]
    with session_scope(sessions) as s:
        apply(s)
    assert findings(sessions) == expected


def test_database_standby_is_detected_or_advised(sessions: sessionmaker[Session], db_url: str) -> None:  # noqa: F811
    build_healthy(sessions)
    with session_scope(sessions) as s:
        detected = pg_standby(s)
        report = run_audit(s, LIMITS)
    # The test cluster has no replica: PostgreSQL says so; SQLite has nothing to ask.
    assert detected is (False if db_url.startswith("postgresql") else None)
    assert [(f["check"], f["severity"]) for f in report["findings"]] == [("db-standby", "advice")]
    assert report["severe"] is False


def test_node_without_dhcp_anywhere_is_advice(sessions: sessionmaker[Session]) -> None:  # noqa: F811
    build_healthy(sessions)
    with session_scope(sessions) as s:
        heartbeat_all(s, subnet=None)
    assert findings(sessions) == {("dhcp-redundancy", "dhcp")}


def test_cli_exit_codes_and_json(sessions: sessionmaker[Session], db_url: str, tmp_path: Path) -> None:  # noqa: F811
    build_healthy(sessions)
    runner = CliRunner()
    config = tmp_path / "node.yaml"
    config.write_text("dead_after_s: 60.0\n")  # the audit reads the farm's bound from the node config
    base = ["--db", db_url, "--config", str(config), "--data-dir", str(tmp_path / "d"), "audit", "--standby-known"]
    clean = runner.invoke(cli, base, catch_exceptions=False)
    assert clean.exit_code == 0, clean.output
    assert "no findings" in clean.output
    with session_scope(sessions) as s:
        _drop_copy(s, "b")
    bad = runner.invoke(cli, [*base, "--json"], catch_exceptions=False)
    assert bad.exit_code == 2, bad.output
    report = json.loads(bad.output)
    assert report["severe"] and report["counts"]["critical"] == 1
    table = runner.invoke(cli, base[:-1], catch_exceptions=False)
    assert table.exit_code == 2
    assert "SEVERITY" in table.output and "vdisk-copies" in table.output and "db-standby" in table.output
