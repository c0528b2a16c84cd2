"""Start real `pvsfarm node` processes for tests (stopped by PID in teardown)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningNode:
    name: str
    proc: subprocess.Popen[str]
    config: Path
    http_port: int
    nbd_port: int
    tftp_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.load(resp)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def write_config(path: Path, name: str, db_url: str, data_dir: Path, **extra: Any) -> dict[str, int]:
    ports = {"http": free_port(), "nbd": free_port(), "tftp": free_port(socket.SOCK_DGRAM)}
    cfg = {
        "name": name, "address": "127.0.0.1", "data_dir": str(data_dir), "database_url": db_url,
        "heartbeat_interval_s": 0.5,
        "http": {"listen_address": "127.0.0.1", "listen_port": ports["http"]},
        "nbd": {"listen_address": "127.0.0.1", "listen_port": ports["nbd"]},
        "tftp": {"listen_address": "127.0.0.1", "listen_port": ports["tftp"]},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return ports


def start_node(tmp: Path, name: str, db_url: str, **extra: Any) -> RunningNode:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / f"{name}.yaml"
    ports = write_config(config, name, db_url, tmp / name, **extra)
    log = tmp / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_")}
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pvsfarm", "--config", str(config), "node"],
                            stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    node = RunningNode(name, proc, config, ports["http"], ports["nbd"], ports["tftp"], log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "node ready" in log.read_text():
            return node
        if proc.poll() is not None:
            raise AssertionError(f"node {name} exited: {log.read_text()}")
        time.sleep(0.1)
    node.stop()
    raise AssertionError(f"node {name} not ready: {log.read_text()}")


def admin(db_url: str, *args: str, config: Path | None = None) -> str:
    """`pvsfarm [--config NODE.yaml] --db URL ...` in-process; the node's config names the server holding copies."""
    from click.testing import CliRunner

    from pvsfarm.cli import cli
    from pvsfarm.commands import register

    register(cli)
    prefix = ["--config", str(config)] if config else []
    result = CliRunner().invoke(cli, [*prefix, "--db", db_url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout
