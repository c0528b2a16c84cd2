"""Servers (farm nodes) and the bootstrap (the ordered server list targets try)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pvsfarm.admin.common import audit, get_server, iso, parse_name
from pvsfarm.db.models import Bootstrap, BootstrapServer, Server, Store, aware, utcnow
from pvsfarm.db.snapshot import open_sessions_by_server
from pvsfarm.errors import Conflict, InvalidInput
from pvsfarm.views import BootstrapMode, ServerState

BOOTSTRAP_ID = 1
MIN_TIMEOUT_MS = 500
MAX_TIMEOUT_MS = 120_000


def server_dict(s: Server, live_sessions: int, dead_after_s: float, now: dt.datetime) -> dict[str, Any]:
    beat = aware(s.heartbeat_at)
    age = (now - beat).total_seconds() if beat else None
    state = s.state.value
    if state == ServerState.UP.value and (age is None or age > dead_after_s):
        state = "dead"
    return {
        "name": s.name,
        "address": s.address,
        "http_port": s.http_port,
        "nbd_port": s.nbd_port,
        "tftp_port": s.tftp_port,
        "state": state,
        "load": live_sessions,
        "heartbeat_at": iso(beat),
        "heartbeat_age_s": round(age, 1) if age is not None else None,
        "health": s.health,
    }


def ensure_server(
    session: Session, name: str, address: str, *, http_port: int, nbd_port: int, tftp_port: int
) -> Server:
    """The row for a node, created (state down until it heartbeats) or updated."""
    server = session.scalar(select(Server).where(Server.name == name))
    if server is None:
        server = Server(name=parse_name(name, "server"), state=ServerState.DOWN, load=0, health="")
        session.add(server)
    server.address, server.http_port, server.nbd_port, server.tftp_port = address, http_port, nbd_port, tftp_port
    session.flush()
    return server


def add_server(session: Session, actor: str, name: str, address: str, ports: dict[str, int]) -> dict[str, Any]:
    if session.scalar(select(Server).where(Server.name == name)) is not None:
        raise Conflict(f"server {name!r} already exists")
    server = ensure_server(session, name, address, **ports)
    audit(session, actor, "add", "server", name, address=address)
    return server_dict(server, 0, 0.0, utcnow())


def list_servers(session: Session, dead_after_s: float) -> list[dict[str, Any]]:
    counts = open_sessions_by_server(session)
    now = utcnow()
    servers = session.scalars(select(Server).order_by(Server.name))
    return [server_dict(s, counts.get(s.id, 0), dead_after_s, now) for s in servers]


def _bootstrap_row(session: Session) -> Bootstrap:
    row = session.get(Bootstrap, BOOTSTRAP_ID)
    if row is None:
        row = Bootstrap(id=BOOTSTRAP_ID, mode=BootstrapMode.LISTED, timeout_ms=5000, version=0)
        session.add(row)
        session.flush()
    return row


def configure_bootstrap(
    session: Session, actor: str, servers: list[str], timeout_ms: int | None, mode: BootstrapMode | None
) -> dict[str, Any]:
    """Replace the bootstrap's ordered server list (and optionally timeout/mode); bumps its version."""
    if not servers:
        raise InvalidInput("the bootstrap needs at least one --server")
    if len(set(servers)) != len(servers):
        raise InvalidInput("a server is listed twice in the bootstrap")
    if timeout_ms is not None and not MIN_TIMEOUT_MS <= timeout_ms <= MAX_TIMEOUT_MS:
        raise InvalidInput(f"--timeout-ms must be between {MIN_TIMEOUT_MS} and {MAX_TIMEOUT_MS}")
    rows = [get_server(session, name) for name in servers]
    boot = _bootstrap_row(session)
    session.execute(delete(BootstrapServer).where(BootstrapServer.bootstrap_id == boot.id))
    for position, server in enumerate(rows):
        session.add(BootstrapServer(bootstrap_id=boot.id, position=position, server_id=server.id))
    if timeout_ms is not None:
        boot.timeout_ms = timeout_ms
    if mode is not None:
        boot.mode = mode
    boot.version += 1
    boot.updated_at = utcnow()
    session.flush()
    audit(session, actor, "configure", "bootstrap", f"v{boot.version}", servers=servers)
    return show_bootstrap(session)


def show_bootstrap(session: Session) -> dict[str, Any]:
    boot = session.get(Bootstrap, BOOTSTRAP_ID)
    if boot is None:
        return {"version": 0, "mode": BootstrapMode.LISTED.value, "timeout_ms": 5000, "updated_at": None, "servers": []}
    entries = session.scalars(
        select(BootstrapServer).where(BootstrapServer.bootstrap_id == boot.id).order_by(BootstrapServer.position)
    ).all()
    return {
        "version": boot.version,
        "mode": boot.mode.value,
        "timeout_ms": boot.timeout_ms,
        "updated_at": iso(boot.updated_at),
        "servers": [
            {"name": e.server.name, "address": e.server.address, "http_port": e.server.http_port}
            for e in entries
        ],
    }


def set_drain(session: Session, actor: str, name: str, drain: bool) -> dict[str, Any]:
    """Drain: no new assignments to the server (maintenance); undrain brings it back.

    Targets already streaming from it stay until they reconnect or the node
    stops; the login service then sends them elsewhere.
    """
    server = get_server(session, name)
    if drain:
        server.state = ServerState.DRAINING
    elif server.state is ServerState.DRAINING:
        server.state = ServerState.UP
    audit(session, actor, "drain" if drain else "undrain", "server", name)
    return server_dict(server, 0, 1e9, utcnow())


def record_store(session: Session, server: Server, path: str, shared: bool) -> None:
    """A node's store: its own row (local), or the one farm-wide row (shared, server NULL)."""
    owner = None if shared else server.id
    row = session.scalar(select(Store).where(Store.path == path, Store.server_id.is_(None) if owner is None
                                             else Store.server_id == owner))
    if row is None:
        session.add(Store(server_id=owner, path=path, shared=shared))
