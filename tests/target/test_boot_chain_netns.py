"""Issue 4 acceptance: a simulated target boots from a two-node farm, inside namespaces.

Topology (one module-wide farm): namespace ``sw`` holds bridge br0; ``s1`` and
``s2`` each run a real ``pvsfarm node`` (DHCP on their eth0, TFTP on port 69,
HTTP and NBD on their own address) sharing one PostgreSQL database (reached
over its Unix socket: the filesystem is shared across network namespaces,
loopback TCP is not); ``cli`` (the registered MAC) and ``unk`` (an unknown
MAC) run ``pvsfarm target``. The vDisk has a verified copy on each server
(``vdisk add`` via node 1's config, ``vdisk copy --server n2`` for node 2's own
file). Tests run in file order; the last one SIGKILLs a node. Teardown kills
the nodes by PID and deletes the namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml
from click.testing import CliRunner

from pvsfarm.cli import cli
from pvsfarm.commands import register

register(cli)
pytestmark = [
    pytest.mark.netns,
    pytest.mark.postgres,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is missing"),
]
ROOT = Path(__file__).resolve().parents[2]
MAC, RESERVED = "52:54:00:77:00:50", "10.77.0.50"
UNKNOWN_MAC = "52:54:00:77:00:99"
SERVERS = {"n1": "10.77.0.1", "n2": "10.77.0.2"}
HTTP_PORT, NBD_PORT = 8080, 10809
IMAGE_BYTES = 4 << 20


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _wait_up(ns: str, ifname: str, timeout_s: float = 5.0) -> None:
    """operstate UP: until linkwatch attaches the qdisc (~1 s), frames are dropped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                             check=True, capture_output=True, text=True).stdout
        if json.loads(out)[0].get("operstate") == "UP":
            return
        time.sleep(0.02)
    raise TimeoutError(f"{ns}/{ifname} did not come up")


class Segment:
    """Namespaces ``pvst-boot-<hex>-<role>`` bridged on one Ethernet segment."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.sw = self._netns("sw")
        ip("-n", self.sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        ip("-n", self.sw, "link", "set", "br0", "up")

    def _netns(self, role: str) -> str:
        name = f"pvst-boot-{self.tag}-{role}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def host(self, role: str, *, mac: str | None = None, addr: str | None = None) -> str:
        ns = self._netns(role)
        port = f"p-{role}"[:15]
        ip("-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.sw, "link", "set", port, "master", "br0", "up")
        if mac:
            ip("-n", ns, "link", "set", "eth0", "address", mac)
        if addr:
            ip("-n", ns, "addr", "add", addr, "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        _wait_up(ns, "eth0")
        _wait_up(self.sw, port)
        return ns

    def delete(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@dataclass
class NsNode:
    name: str
    ns: str
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


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_")}


def start_node(tmp: Path, name: str, ns: str, db_url: str) -> NsNode:
    addr = SERVERS[name]
    cfg = {
        "name": name, "address": addr, "data_dir": str(tmp / name), "database_url": db_url,
        "heartbeat_interval_s": 0.5, "dead_after_s": 3.0,
        "http": {"listen_address": addr, "listen_port": HTTP_PORT},
        "nbd": {"listen_address": addr, "listen_port": NBD_PORT},
        "tftp": {"listen_address": addr, "listen_port": 69},
        "dhcp": {"interface": "eth0", "server_ip": addr, "subnet": "10.77.0.0/24"},
    }
    config, log = tmp / f"{name}.yaml", tmp / f"{name}.log"
    config.write_text(yaml.safe_dump(cfg))
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pvsfarm", "--config",
                                 str(config), "node"], stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    return NsNode(name, ns, proc, config, log)


def wait_ready(node: NsNode, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = node.log.read_text()
        if "node ready" in text:
            return
        if node.proc.poll() is not None:
            raise AssertionError(f"node {node.name} exited: {text}")
        time.sleep(0.1)
    raise AssertionError(f"node {node.name} not ready: {node.log.read_text()}")


def admin(db_url: str, *args: str, config: Path | None = None) -> str:
    head = ["--config", str(config)] if config else []
    result = CliRunner().invoke(cli, [*head, "--db", db_url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def farm_db(postgresql_proc) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(TCP URL for the admin CLI here, Unix-socket URL for the nodes in their namespaces)."""
    p = postgresql_proc
    name = f"pvsfarm_boot_{uuid.uuid4().hex[:8]}"
    dsn = f"host={p.host} port={p.port} user={p.user} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (f"postgresql+psycopg2://{p.user}@{p.host}:{p.port}/{name}",
               f"postgresql+psycopg2://{p.user}@/{name}?host={p.unixsocketdir}&port={p.port}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Farm:
    seg: Segment
    nodes: dict[str, NsNode]
    client: str
    stranger: str
    digest: str
    tmp: Path


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, farm_db: tuple[str, str]) -> Iterator[Farm]:
    tcp_url, socket_url = farm_db
    tmp = tmp_path_factory.mktemp("bootfarm")
    image = tmp / "base.img"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    admin(tcp_url, "db", "upgrade")
    seg, nodes = Segment(), {}
    try:
        server_ns = {n: seg.host(n.replace("n", "s"), addr=f"{a}/24") for n, a in SERVERS.items()}
        client, stranger = seg.host("cli", mac=MAC), seg.host("unk", mac=UNKNOWN_MAC)
        nodes = {n: start_node(tmp, n, server_ns[n], socket_url) for n in SERVERS}
        for node in nodes.values():
            wait_ready(node)
        own_copy = tmp / "n2" / "store" / "base.img"  # node 2 keeps its own file, as on local stores
        shutil.copyfile(image, own_copy)
        admin(tcp_url, "vdisk", "add", "base", "--file", str(image), "--no-copy", config=nodes["n1"].config)
        admin(tcp_url, "vdisk", "copy", "base", "--server", "n2", "--path", str(own_copy))
        admin(tcp_url, "device", "add", "--mac", MAC, "--name", "t1", "--ip", RESERVED, "--vdisk", "base")
        admin(tcp_url, "bootstrap", "configure", "--server", "n1", "--server", "n2", "--timeout-ms", "1000")
        time.sleep(1.2)  # both nodes re-read the inventory every heartbeat (0.5 s)
        yield Farm(seg, nodes, client, stranger, hashlib.sha256(image.read_bytes()).hexdigest(), tmp)
    finally:
        for node in nodes.values():
            node.stop()
        seg.delete()


def target_cmd(ns: str, mac: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "pvsfarm", "target", "--mac", mac,
            "--iface", "eth0", "--json", *args]


def run_target(ns: str, mac: str, *args: str, timeout_s: float = 60) -> tuple[int, dict, str, float]:
    start = time.monotonic()
    res = subprocess.run(target_cmd(ns, mac, *args), capture_output=True, text=True, timeout=timeout_s,
                         env=_env(), cwd=ROOT)
    report = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, report, res.stderr, time.monotonic() - start


def test_target_boots_the_whole_chain(farm: Farm) -> None:
    rc, report, err, _ = run_target(farm.client, MAC, "--verify-sha256", farm.digest)
    assert rc == 0, err
    assert report["address"] == f"{RESERVED}/24"
    assert report["dhcp_server"] in SERVERS.values() and report["tftp_server"] == report["dhcp_server"]
    assert report["boot_file"] == "boot.ipxe"
    assert report["bootstrap_servers"] == [f"http://{a}:{HTTP_PORT}" for a in SERVERS.values()]
    assert report["server"] in SERVERS and report["vdisk"] == "base"
    assert report["bytes_read"] == IMAGE_BYTES and report["sha256"] == farm.digest and report["verified"] is True
    assert report["failovers"] == []
    assert set(report["timings_s"]) >= {"dhcp", "tftp", "login", "nbd_connect", "nbd_read", "total"}
    print(f"\nboot chain timings: {report['timings_s']} (server {report['server']})")


def test_unknown_mac_gets_no_lease(farm: Farm) -> None:
    rc, report, err, elapsed = run_target(farm.stranger, UNKNOWN_MAC, "--dhcp-timeout-s", "0.5")
    assert rc != 0 and report["step"] == "dhcp" and "no DHCPOFFER" in report["error"]
    assert report["address"] is None and elapsed < 15
    assert "dhcp" in err


def _kill_when_streaming(proc: subprocess.Popen[str], nodes: dict[str, NsNode], lines: list[str]) -> str:
    """SIGKILL the node the target streams from, a few reads after it connected."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for line in list(lines):
            if "nbd: connected to " in line:
                victim = line.split("nbd: connected to ", 1)[1].split()[0]
                time.sleep(0.3)
                nodes[victim].proc.send_signal(signal.SIGKILL)
                nodes[victim].proc.wait(timeout=10)
                return victim
        time.sleep(0.02)
    raise AssertionError("target never connected over NBD:\n" + "".join(lines))


def test_target_fails_over_when_its_server_is_killed(farm: Farm) -> None:
    proc = subprocess.Popen(target_cmd(farm.client, MAC, "--verify-sha256", farm.digest, "--read-kib", "128",
                                       "--read-delay-ms", "40"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    lines: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, ""):  # ends at EOF
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        victim = _kill_when_streaming(proc, farm.nodes, lines)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert proc.returncode == 0, "".join(lines)
    report = json.loads(out)
    survivor = next(n for n in SERVERS if n != victim)
    assert report["sha256"] == farm.digest and report["verified"] is True
    assert report["first_server"] == victim and report["server"] == survivor
    [failover] = report["failovers"]
    assert failover["from_server"] == victim and failover["to_server"] == survivor
    assert 0 < failover["offset"] < IMAGE_BYTES and failover["resumed"] is True
    assert failover["seconds"] < 10
    print(f"\nfailover {victim} -> {survivor}: {failover['seconds']:.3f} s, {failover['attempts']} attempt(s)")
