"""A healthy farm built in the database for audit tests (servers, vDisk, devices, bootstrap, node facts)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pvsfarm.admin import devices, farm
from pvsfarm.admin.node_facts import report_facts
from pvsfarm.config import parse_config
from pvsfarm.db import migrate
from pvsfarm.db.engine import make_engine, session_scope
from pvsfarm.db.models import AuditEntry, Server, VDisk, VDiskCopy, utcnow
from pvsfarm.db.snapshot import generation
from pvsfarm.views import BootMethod, CacheType, CopyState, ServerState, VDiskMode

ACTOR = "test@audit"
DIGEST = "sha256:" + "cd" * 32
SUBNET = "10.0.0.0/24"
PORTS = {"http_port": 8080, "nbd_port": 10809, "tftp_port": 69}


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def server(s: Session, name: str) -> Server:
    row = s.scalar(select(Server).where(Server.name == name))
    assert row is not None
    return row


def heartbeat_all(s: Session, *, subnet: str | None = SUBNET, shared: bool = True) -> None:
    """What each node's sync writes: heartbeat, health, and its facts (via the node's own `report_facts`)."""
    dhcp = {"interface": "eth0", "server_ip": "10.0.0.1", "subnet": subnet} if subnet else {}
    cfg = parse_config({"dhcp": dhcp, "store": {"shared": shared}})
    gen = generation(s)
    for row in s.scalars(select(Server)):
        row.state, row.heartbeat_at, row.health = ServerState.UP, utcnow(), "ok"
        report_facts(row, cfg, gen, utcnow().timestamp())


def build_healthy(factory: sessionmaker[Session]) -> None:
    """Three live nodes, all serving DHCP for 10.0.0.0/24; vDisk 'win' verified on a and b;
    two devices in collection 'lab' reserved in the subnet; bootstrap a, b."""
    with session_scope(factory) as s:
        for i, name in enumerate("abc", start=1):
            farm.add_server(s, ACTOR, name, f"10.0.0.{i}", PORTS)
        vdisk = VDisk(name="win", size_bytes=1 << 20, mode=VDiskMode.STANDARD, cache_type=CacheType.SERVER,
                      digest=DIGEST, boot_method=BootMethod.SANBOOT, file_name="win.img")
        s.add(vdisk)
        s.flush()
        for name in "ab":
            s.add(VDiskCopy(vdisk_id=vdisk.id, server_id=server(s, name).id, path=f"/store/{name}/win.img",
                            digest=DIGEST, state=CopyState.VERIFIED, progress_pct=100))
        devices.add_collection(s, ACTOR, "lab", "")
        for i in range(2):
            devices.add_device(s, ACTOR, devices.make_spec(f"52:54:00:00:00:0{i + 1}", f"t{i + 1}",
                                                           f"10.0.0.{51 + i}", "lab", "win"))
        farm.configure_bootstrap(s, ACTOR, ["a", "b"], None, None)
    with session_scope(factory) as s:
        heartbeat_all(s)
        # The last change was made a while ago: the nodes have settled on its generation.
        s.execute(update(AuditEntry).values(at=utcnow() - dt.timedelta(minutes=10)))
