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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import (ROOT, NsNode, Segment, admin, clean_env, farm_db, run_target, start_ns_node,  # noqa: F401
                         target_cmd, wait_log)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.postgres,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is missing"),
]
MAC, RESERVED = "52:54:00:77:00:50", "10.77.0.50"
UNKNOWN_MAC = "52:54:00:77:00:99"
SERVERS = {"n1": "10.77.0.1", "n2": "10.77.0.2"}
HTTP_PORT, NBD_PORT = 8080, 10809
IMAGE_BYTES = 4 << 20


def start_node(tmp: Path, name: str, ns: str, db_url: str) -> NsNode:
    return start_ns_node(tmp, name, ns, SERVERS[name], "10.77.0.0/24", db_url,
                         http_port=HTTP_PORT, nbd_port=NBD_PORT)


def wait_ready(node: NsNode, timeout_s: float = 30) -> None:
    wait_log(node, "node ready", timeout_s)


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
    seg, nodes = Segment("pvst-boot"), {}
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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
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
