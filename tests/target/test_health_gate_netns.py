"""Issue 5 acceptance: a node whose TFTP died stops answering DHCP, so targets
boot through its healthy peer (the seed article's co-hosting weak spot).

Two real nodes (A = ``n2``, B = ``n1``) with DHCP on one bridge and one
PostgreSQL. A's TFTP is broken through its loopback-only fault endpoint; A's
own self-check must notice and pause A's DHCP. A simulated target then boots
(DHCP, TFTP, login, NBD read, sha256) entirely through B: the DHCP server id
and TFTP server are B because of the gate; login and streaming are B by the
farm's ordinary rules (B is first in the bootstrap and wins the load tie by
name), which A's TFTP fault rightly does not change: A's HTTP and NBD are fine.
Teardown kills the nodes by PID and deletes the namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import NsNode, Segment, admin, farm_db, run_target, start_ns_node, wait_log  # noqa: F401

pytestmark = [
    pytest.mark.netns,
    pytest.mark.postgres,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is missing"),
]
MAC, RESERVED = "52:54:00:78:00:50", "10.78.0.50"
SUBNET = "10.78.0.0/24"
SERVERS = {"n1": "10.78.0.1", "n2": "10.78.0.2"}
IMAGE_BYTES = 2 << 20


@dataclass
class Farm:
    nodes: dict[str, NsNode]
    client: str
    digest: str
    tcp_url: str


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, farm_db: tuple[str, str]) -> Iterator[Farm]:  # noqa: F811
    tcp_url, socket_url = farm_db
    tmp = tmp_path_factory.mktemp("healthgate")
    admin(tcp_url, "db", "upgrade")
    seg, nodes = Segment("pvst-hg"), {}
    try:
        server_ns = {n: seg.host(n.replace("n", "s"), addr=f"{a}/24") for n, a in SERVERS.items()}
        client = seg.host("cli", mac=MAC)
        nodes = {n: start_ns_node(tmp, n, server_ns[n], a, SUBNET, socket_url, admin_faults=True)
                 for n, a in SERVERS.items()}
        for node in nodes.values():
            wait_log(node, "node ready")
        image = tmp / "n1" / "store" / "base.img"  # the peer pulls its own copy (store/replicate.py)
        image.write_bytes(os.urandom(IMAGE_BYTES))
        admin(tcp_url, "vdisk", "add", "base", "--file", str(image), "--no-copy", config=nodes["n1"].config)
        admin(tcp_url, "device", "add", "--mac", MAC, "--name", "t1", "--ip", RESERVED, "--vdisk", "base")
        admin(tcp_url, "bootstrap", "configure", "--server", "n1", "--server", "n2", "--timeout-ms", "1000")
        time.sleep(1.2)  # both nodes re-read the inventory every heartbeat (0.5 s)
        yield Farm(nodes, client, hashlib.sha256(image.read_bytes()).hexdigest(), tcp_url)
    finally:
        for node in nodes.values():
            node.stop()
        seg.delete()


def set_fault(node: NsNode, state: str) -> dict:  # type: ignore[type-arg]
    """POST /admin/fault from inside the node's namespace, over loopback."""
    code = ("import json, urllib.request as u; r = u.Request('http://127.0.0.1:8080/admin/fault', method='POST', "
            f"data=json.dumps({{'service': 'tftp', 'state': '{state}'}}).encode()); "
            "print(u.urlopen(r, timeout=5).read().decode())")
    return json.loads(node.run_here(code))


def health_page(node: NsNode) -> dict:  # type: ignore[type-arg]
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/health', timeout=5).read().decode())"
    return json.loads(node.run_here(code))


def listed_health(tcp_url: str) -> dict[str, str]:
    return {r["name"]: r["health"] for r in json.loads(admin(tcp_url, "server", "list", "--json"))}


def test_dead_tftp_pauses_dhcp_and_the_peer_boots_the_target(farm: Farm) -> None:
    a, b = farm.nodes["n2"], farm.nodes["n1"]
    assert set_fault(a, "down") == {"service": "tftp", "state": "down"}
    paused_after = wait_log(a, "dhcp: paused, tftp unhealthy", timeout_s=10)
    deadline = time.monotonic() + 5
    while "tftp" not in listed_health(farm.tcp_url)["n2"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listed_health(farm.tcp_url) == {"n1": "ok", "n2": "tftp down: timeout"}

    page = health_page(a)
    assert page["status"] == "degraded" and page["failing"] == ["tftp"] and page["dhcp"]["answering"] is False
    gated_before = page["dhcp"]["gated"]

    rc, report, err, elapsed = run_target(farm.client, MAC, "--verify-sha256", farm.digest, timeout_s=60)
    assert rc == 0, err
    assert report["address"] == f"{RESERVED}/24"
    assert report["dhcp_server"] == b.address and report["tftp_server"] == b.address
    assert report["login_url"].startswith(f"http://{b.address}:")
    assert report["first_server"] == "n1" and report["server"] == "n1" and report["failovers"] == []
    assert report["sha256"] == farm.digest and report["verified"] is True
    assert health_page(a)["dhcp"]["gated"] > gated_before  # A heard the target and stayed silent
    print(f"\nDHCP paused {paused_after:.2f} s after the fault; boot through B in {elapsed:.2f} s: "
          f"{report['timings_s']}")

    assert set_fault(a, "up")["state"] == "up"
    resumed_after = wait_log(a, "dhcp: resumed", timeout_s=10)
    print(f"DHCP resumed {resumed_after:.2f} s after the fault was lifted")
    assert "dhcp: paused" not in b.log.read_text()


def test_fault_endpoint_refuses_the_network(farm: Farm) -> None:
    """From another host on the segment (not loopback) the endpoint answers 403."""
    a = farm.nodes["n2"]
    code = ("import urllib.request as u, urllib.error as e\n"
            f"r = u.Request('http://{a.address}:8080/admin/fault', method='POST', data=b'{{}}')\n"
            "try:\n    u.urlopen(r, timeout=5)\nexcept e.HTTPError as x:\n    print(x.code)")
    assert farm.nodes["n1"].run_here(code).strip() == "403"
