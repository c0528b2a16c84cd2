"""Network-namespace helpers for farm tests: a bridged segment, real nodes in
their own namespaces on one PostgreSQL, and the simulated target.

Everything a test creates is torn down by PID (nodes) and by namespace
deletion (`Segment.delete`). The nodes reach PostgreSQL over its Unix socket:
the filesystem is shared across network namespaces, loopback TCP is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pvsfarm.lab.netns import Segment, ip, wait_up  # noqa: F401 - the product's segment, shared with the demo
from tests.nodes import admin  # noqa: F401 - one in-process admin CLI for every test

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class NsNode:
    name: str
    ns: str
    address: str
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def run_here(self, code: str, timeout_s: float = 10) -> str:
        """Run Python ``code`` inside the node's namespace; its stdout."""
        res = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=timeout_s, env=clean_env(), cwd=ROOT)
        assert res.returncode == 0, res.stderr
        return res.stdout


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_")}


def start_ns_node(tmp: Path, name: str, ns: str, addr: str, subnet: str, db_url: str, *,
                  http_port: int = 8080, nbd_port: int = 10809, **extra: Any) -> NsNode:
    """A real ``pvsfarm node`` in ``ns``, DHCP on its eth0; ``extra`` adds config keys."""
    cfg = {
        "name": name, "address": addr, "data_dir": str(tmp / name), "database_url": db_url,
        "heartbeat_interval_s": 0.5, "dead_after_s": 3.0,
        "http": {"listen_address": addr, "listen_port": http_port},
        "nbd": {"listen_address": addr, "listen_port": nbd_port},
        "tftp": {"listen_address": addr, "listen_port": 69},
        "dhcp": {"interface": "eth0", "server_ip": addr, "subnet": subnet},
        **extra,
    }
    config, log = tmp / f"{name}.yaml", tmp / f"{name}.log"
    config.write_text(yaml.safe_dump(cfg))
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pvsfarm", "--config",
                                 str(config), "node"], stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                cwd=ROOT)
    return NsNode(name, ns, addr, proc, config, log)


def wait_log(node: NsNode, needle: str, timeout_s: float = 30) -> float:
    """Seconds until ``needle`` appears in the node's log."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        text = node.log.read_text()
        if needle in text:
            return time.monotonic() - start
        if node.proc.poll() is not None:
            raise AssertionError(f"node {node.name} exited: {text}")
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in node {node.name}'s log: {node.log.read_text()}")


@pytest.fixture(scope="module")
def farm_db(postgresql_proc) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(TCP URL for the admin CLI here, Unix-socket URL for the nodes in their namespaces)."""
    p = postgresql_proc
    name = f"pvsfarm_ns_{uuid.uuid4().hex[:8]}"
    dsn = f"host={p.host} port={p.port} user={p.user} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (f"postgresql+psycopg2://{p.user}@{p.host}:{p.port}/{name}",
               f"postgresql+psycopg2://{p.user}@/{name}?host={p.unixsocketdir}&port={p.port}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def target_cmd(ns: str, mac: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "pvsfarm", "target", "--mac", mac,
            "--iface", "eth0", "--json", *args]


def run_target(ns: str, mac: str, *args: str,
               timeout_s: float = 60) -> tuple[int, dict, str, float]:  # type: ignore[type-arg]
    """(exit code, JSON report, stderr, seconds) of one simulated boot."""
    start = time.monotonic()
    res = subprocess.run(target_cmd(ns, mac, *args), capture_output=True, text=True, timeout=timeout_s,
                         env=clean_env(), cwd=ROOT)
    report = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, report, res.stderr, time.monotonic() - start
