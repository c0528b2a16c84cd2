"""Gather the farm's facts from the database for the pure `audit.audit`."""

from __future__ import annotations

import time
from ipaddress import IPv4Network
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pvsfarm.admin.audit import DatabaseFacts, FarmFacts, Limits, MediaFacts, NodeFacts, audit, is_severe
from pvsfarm.admin.media import media_servers
from pvsfarm.db.models import AuditEntry, IssuedMedia, Server
from pvsfarm.db.snapshot import epoch, load_snapshot


def _subnet(value: str | None) -> IPv4Network | None:
    if not value:
        return None
    try:
        return IPv4Network(value, strict=False)
    except ValueError:
        return None  # a node with a broken dhcp.subnet does not serve it (DhcpSettings refuses it)


def _nodes(session: Session, views: dict[str, Any]) -> tuple[NodeFacts, ...]:
    rows = session.scalars(select(Server).order_by(Server.name))
    return tuple(NodeFacts(views[r.name], _subnet(r.dhcp_subnet), epoch(r.offline_cache_at),
                           r.inventory_generation, r.store_shared) for r in rows if r.name in views)


def pg_standby(session: Session) -> bool | None:
    """PostgreSQL: a streaming standby is attached (a row in pg_stat_replication); None = cannot tell."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    try:
        with session.begin_nested():
            count = session.execute(text("SELECT count(*) FROM pg_stat_replication")).scalar_one()
    except SQLAlchemyError:
        return None
    return count > 0


def gather_facts(session: Session, limits: Limits, *, standby: bool | None = None,
                 now: float | None = None) -> FarmFacts:
    """Read everything the checks judge. ``standby`` overrides detection (a standby
    that ``pg_stat_replication`` does not show: managed databases, log shipping)."""
    snap = load_snapshot(session)
    backend = session.get_bind().dialect.name
    media = tuple(MediaFacts(m.id, m.kind, m.bootstrap_version, media_servers(m))
                  for m in session.scalars(select(IssuedMedia).order_by(IssuedMedia.id)))
    return FarmFacts(
        now=time.time() if now is None else now,
        nodes=_nodes(session, {s.name: s for s in snap.servers}),
        bootstrap=snap.bootstrap,
        vdisks=tuple(snap.vdisks[k] for k in sorted(snap.vdisks)),
        copies=tuple(c for k in sorted(snap.copies) for c in snap.copies[k]),
        devices=tuple(sorted(snap.devices.values(), key=lambda d: d.name)),
        generation=snap.generation,
        generation_changed_at=epoch(session.scalar(select(func.max(AuditEntry.at)))),
        database=DatabaseFacts(backend, standby if standby is not None else pg_standby(session)),
        media=media,
        limits=limits,
    )


def run_audit(session: Session, limits: Limits, *, standby: bool | None = None) -> dict[str, Any]:
    """The audit as data: findings (most severe first) and whether any is severe."""
    findings = audit(gather_facts(session, limits, standby=standby))
    counts = {sev: sum(1 for f in findings if f.severity.value == sev) for sev in ("critical", "warning", "advice")}
    return {"severe": is_severe(findings), "counts": counts, "findings": [f.as_dict() for f in findings]}
