"""Read what booting needs from the database into frozen views, in one go.

The node keeps the result in memory (`MemoryInventory`) and refreshes it in
the background; DHCP, TFTP, login and NBD read only the in-memory copy.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from pvsfarm.addr import MacAddress
from pvsfarm.db.models import (Bootstrap, BootstrapServer, Device, FarmSetting, Server, StreamSession, VDisk,
                               VDiskCopy, aware)
from pvsfarm.views import (
    BootstrapMode,
    BootstrapView,
    CopyView,
    DeviceView,
    ServerView,
    VDiskView,
)

SECRET_KEY = "export_token_secret"
GENERATION_KEY = "inventory_generation"


def epoch(value: dt.datetime | None) -> float | None:
    stamp = aware(value)
    return stamp.timestamp() if stamp is not None else None


@dataclass(frozen=True)
class Snapshot:
    devices: dict[MacAddress, DeviceView] = field(default_factory=dict)
    vdisks: dict[str, VDiskView] = field(default_factory=dict)
    servers: tuple[ServerView, ...] = ()
    copies: dict[str, tuple[CopyView, ...]] = field(default_factory=dict)
    bootstrap: BootstrapView = BootstrapView((), 5000, BootstrapMode.LISTED, 0)
    secret: bytes = b""
    generation: int = -1


def farm_secret(session: Session) -> bytes:
    """The token-signing secret, created on first use."""
    row = session.get(FarmSetting, SECRET_KEY)
    if row is None:
        row = FarmSetting(key=SECRET_KEY, value=secrets.token_hex(32))
        session.add(row)
        session.flush()
    return bytes.fromhex(row.value)


def _devices(session: Session) -> dict[MacAddress, DeviceView]:
    out: dict[MacAddress, DeviceView] = {}
    stmt = select(Device).options(joinedload(Device.collection), joinedload(Device.vdisk))
    for d in session.scalars(stmt):
        mac = MacAddress(bytes.fromhex(d.mac.replace(":", "")))
        out[mac] = DeviceView(mac, d.name, IPv4Address(d.ipv4) if d.ipv4 else None, d.collection.name,
                              d.vdisk.name if d.vdisk else None, d.enabled)
    return out


def _bootstrap(session: Session) -> BootstrapView:
    row = session.get(Bootstrap, 1)
    if row is None:
        return BootstrapView((), 5000, BootstrapMode.LISTED, 0)
    names = session.scalars(
        select(Server.name).join(BootstrapServer, BootstrapServer.server_id == Server.id)
        .where(BootstrapServer.bootstrap_id == row.id).order_by(BootstrapServer.position)
    ).all()
    return BootstrapView(tuple(names), row.timeout_ms, row.mode, row.version)


def generation(session: Session) -> int:
    row = session.get(FarmSetting, GENERATION_KEY)
    return int(row.value) if row is not None else 0


def open_sessions_by_server(session: Session) -> dict[int, int]:
    """server id → open stream sessions: every server's load, in one grouped query."""
    rows = session.execute(select(StreamSession.server_id, func.count())
                           .where(StreamSession.ended_at.is_(None)).group_by(StreamSession.server_id))
    return {server_id: count for server_id, count in rows}


def _servers(session: Session, loads: dict[int, int] | None = None) -> tuple[ServerView, ...]:
    """Loads are counted from the open sessions, not read from ``servers.load``: that column
    is written by each server for itself, once a heartbeat, so it lags the sessions a peer
    just assigned to it (boot storm: 500 logins on n1 ended 222/278 on n1/n2). ``loads``:
    the counts when the caller already has them (`open_sessions_by_server`)."""
    live = open_sessions_by_server(session) if loads is None else loads
    return tuple(
        ServerView(s.name, s.address, s.http_port, s.nbd_port, s.tftp_port, s.state, epoch(s.heartbeat_at),
                   live.get(s.id, 0), s.health or "ok")
        for s in session.scalars(select(Server).order_by(Server.name))
    )


def load_snapshot(session: Session, previous: Snapshot | None = None,
                  loads: dict[int, int] | None = None) -> Snapshot:
    """A fresh snapshot; servers (liveness, load) are always re-read, the rest
    only when the inventory generation moved since ``previous``."""
    gen = generation(session)
    if previous is not None and previous.generation == gen:
        return replace(previous, servers=_servers(session, loads))
    vdisks = {
        v.name: VDiskView(v.name, v.size_bytes, v.mode, v.cache_type, v.digest, v.boot_method)
        for v in session.scalars(select(VDisk))
    }
    servers = _servers(session, loads)
    copies: dict[str, list[CopyView]] = {}
    stmt = select(VDiskCopy).options(joinedload(VDiskCopy.vdisk), joinedload(VDiskCopy.server))
    for c in session.scalars(stmt):
        copies.setdefault(c.vdisk.name, []).append(CopyView(c.vdisk.name, c.server.name, c.path, c.digest, c.state))
    return Snapshot(
        devices=_devices(session),
        vdisks=vdisks,
        servers=servers,
        copies={k: tuple(v) for k, v in copies.items()},
        bootstrap=_bootstrap(session),
        secret=farm_secret(session),
        generation=gen,
    )


class MemoryInventory:
    """The Inventory protocol over a Snapshot, swapped atomically on refresh."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.snapshot = snapshot or Snapshot()

    def replace(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def device_by_mac(self, mac: MacAddress) -> DeviceView | None:
        return self.snapshot.devices.get(mac)

    def vdisk(self, name: str) -> VDiskView | None:
        return self.snapshot.vdisks.get(name)

    def servers(self) -> tuple[ServerView, ...]:
        return self.snapshot.servers

    def copies(self, vdisk: str) -> tuple[CopyView, ...]:
        return self.snapshot.copies.get(vdisk, ())

    def bootstrap(self) -> BootstrapView:
        return self.snapshot.bootstrap
