"""A database outage: boots and streaming go on from memory and the offline
cache, admin commands fail with one line, the journal is written back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from benchmarks.pg import ThrowawayPostgres
from tests.conftest import have
from tests.nodes import RunningNode, admin, start_node

MACS = [f"52:54:00:00:0a:{i:02x}" for i in range(1, 5)]
pytestmark = pytest.mark.skipif(not have("nbdinfo"), reason="needs libnbd-bin")


@pytest.fixture
def pg() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as cluster:
        yield cluster


def wait_for(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def boot(node: RunningNode, mac: str) -> dict | None:  # type: ignore[type-arg]
    try:
        return node.get_json(f"/boot.json?mac={mac.replace(':', '%3A')}")
    except (urllib.error.URLError, OSError):
        return None


def nbd_size(node: RunningNode, token: str) -> int:
    out = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{node.nbd_port}/{token}"], capture_output=True,
                         text=True, timeout=20, check=True)
    return int(out.stdout)


def test_database_outage(pg: ThrowawayPostgres, tmp_path: Path) -> None:
    admin(pg.url, "db", "upgrade")
    image = tmp_path / "base.img"
    image.write_bytes(os.urandom(1 << 20))
    node = start_node(tmp_path, "n1", pg.url)
    try:
        admin(pg.url, "vdisk", "add", "base", "--file", str(image), config=node.config)
        for i, mac in enumerate(MACS):
            admin(pg.url, "device", "add", "--mac", mac, "--name", f"t{i}", "--vdisk", "base")
        admin(pg.url, "bootstrap", "configure", "--server", "n1")
        first = wait_for(lambda: boot(node, MACS[0]), 10, "login before the outage")
        assert nbd_size(node, first["export"]) == 1 << 20

        pg.stop("immediate")
        wait_for(lambda: "database unavailable" in node.log.read_text(), 15, "the node noticing the outage")
        during = boot(node, MACS[1])
        assert during is not None and during["server"] == "n1"
        assert nbd_size(node, during["export"]) == 1 << 20
        cli = subprocess.run([sys.executable, "-m", "pvsfarm", "--db", pg.url, "device", "list"],
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 1 and cli.stderr.strip().count("\n") == 0
        assert "database unavailable" in cli.stderr

        node.stop()  # a restart while the database is still down comes up from the offline cache
        node = start_node(tmp_path, "n1", pg.url)
        assert "offline cache" in node.log.read_text()
        again = wait_for(lambda: boot(node, MACS[2]), 10, "login from the offline cache")
        assert nbd_size(node, again["export"]) == 1 << 20

        pg.start_again()
        wait_for(lambda: "reachable again" in node.log.read_text(), 20, "the node reconnecting")
        engine = create_engine(pg.url)
        with engine.connect() as conn:
            rows = conn.execute(text("select d.mac from stream_sessions s join devices d on d.id = s.device_id")).all()
        engine.dispose()
        assert {r[0] for r in rows} >= set(MACS[:3])
        servers = json.loads(admin(pg.url, "server", "list", "--json"))
        assert servers[0]["state"] == "up"

        node.stop()  # restarted after the outage: the written-back journal is not replayed
        node = start_node(tmp_path, "n1", pg.url)
        time.sleep(2.0)  # four heartbeats
        assert "inventory sync failed" not in node.log.read_text()
        servers = json.loads(admin(pg.url, "server", "list", "--json"))
        assert servers[0]["state"] == "up" and servers[0]["heartbeat_age_s"] < 1.5
    finally:
        node.stop()
