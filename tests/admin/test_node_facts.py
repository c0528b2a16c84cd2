"""A node's heartbeat carries the facts the audit judges it by (written by `Node.sync`)."""

from __future__ import annotations

import time
from ipaddress import IPv4Network
from pathlib import Path

from sqlalchemy import select

from pvsfarm.admin.audit import Limits
from pvsfarm.admin.audit_gather import gather_facts
from pvsfarm.app import App
from pvsfarm.config import parse_config
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import Server
from pvsfarm.db.snapshot import generation
from pvsfarm.node import Node


def test_sync_reports_dhcp_subnet_generation_offline_cache_and_store(db_url: str, tmp_path: Path) -> None:
    cfg = parse_config({"name": "n1", "data_dir": str(tmp_path / "data"), "store": {"shared": True},
                        "dhcp": {"interface": "eth9", "server_ip": "10.1.0.1", "subnet": "10.1.0.0/24"}})
    app = App(config=cfg, db_url=db_url)
    app.upgrade()
    node = Node(app, say=lambda _line: None)
    try:
        node.register()
        before = time.time()
        node.save_offline(force=True)
        node.sync()
        with session_scope(app.sessions()) as s:
            row = s.scalar(select(Server).where(Server.name == "n1"))
            assert row is not None
            assert (row.dhcp_subnet, row.store_shared) == ("10.1.0.0/24", True)
            assert row.inventory_generation == generation(s)
            facts = gather_facts(s, Limits(), standby=True)
        (n1,) = facts.nodes
        assert n1.dhcp_subnet == IPv4Network("10.1.0.0/24") and n1.store_shared is True
        assert n1.offline_cache_at is not None and abs(n1.offline_cache_at - before) < 5
        assert facts.live(n1)
    finally:
        app.close()
