"""The login API and range reads, driven by curl against a real node."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import have
from tests.nodes import RunningNode, admin, start_node

pytestmark = pytest.mark.skipif(not have("curl"), reason="needs curl")
MAC = "52:54:00:aa:bb:01"
ENC = MAC.replace(":", "%3A")
SIZE = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, bytes]]:
    tmp = tmp_path_factory.mktemp("http")
    db = f"sqlite:///{tmp / 'farm.sqlite'}"
    data = os.urandom(SIZE)
    (tmp / "base.img").write_bytes(data)
    node = start_node(tmp, "n1", db)
    try:
        admin(db, "vdisk", "add", "base", "--file", str(tmp / "base.img"), config=node.config)
        admin(db, "device", "add", "--mac", MAC, "--name", "t1", "--vdisk", "base")
        admin(db, "device", "add", "--mac", "52:54:00:aa:bb:02", "--name", "off", "--vdisk", "base", "--disabled")
        admin(db, "server", "add", "n2", "--address", "127.0.0.2")
        admin(db, "bootstrap", "configure", "--server", "n1", "--server", "n2", "--timeout-ms", "2000")
        node.get_json("/health")
        yield node, data
    finally:
        node.stop()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", "-S", "--max-time", "20", *args], capture_output=True, timeout=30)


def wait_json(node: RunningNode) -> dict:  # type: ignore[type-arg]
    import time

    for _ in range(50):
        out = curl("-w", "\n%{http_code}", f"{node.url}/boot.json?mac={ENC}").stdout.decode()
        body, code = out.rsplit("\n", 1)
        if code == "200":
            return json.loads(body)
        time.sleep(0.2)
    raise AssertionError(out)


def test_bootstrap_lists_servers_in_order(farm: tuple[RunningNode, bytes]) -> None:
    import time

    node, _ = farm
    for _ in range(50):  # the node re-reads the inventory every heartbeat (0.5 s here)
        text = curl(f"{node.url}/bootstrap.ipxe").stdout.decode()
        chains = [line for line in text.splitlines() if line.startswith("chain --timeout 2000")]
        if len(chains) == 2:
            break
        time.sleep(0.2)
    assert text.startswith("#!ipxe")
    assert [c.split()[3].split("/boot")[0] for c in chains] == [node.url, "http://127.0.0.2:8080"]
    assert "${net0/mac:hexhyp}" in chains[0]


def test_boot_script_sanboots_from_the_assigned_server(farm: tuple[RunningNode, bytes]) -> None:
    node, _ = farm
    wait_json(node)
    script = curl(f"{node.url}/boot?mac={ENC}").stdout.decode()
    assert script.startswith("#!ipxe")
    (line,) = [line for line in script.splitlines() if line.startswith("sanboot")]
    assert f"{node.url}/vdisk/" in line


def test_boot_json_and_same_answer_twice(farm: tuple[RunningNode, bytes]) -> None:
    node, _ = farm
    first, second = wait_json(node), wait_json(node)
    assert first["server"] == second["server"] == "n1"
    assert first["nbd_port"] == node.nbd_port and first["size_bytes"] == SIZE
    assert [s["name"] for s in first["farm"]] == ["n1"]  # n2 is registered but not live


@pytest.mark.parametrize(("mac", "needle"), [("52%3A54%3A00%3A00%3A00%3A09", "unknown device"),
                                             ("52:54:00:aa:bb:02", "disabled")])
def test_refused_devices_get_a_retry_script(farm: tuple[RunningNode, bytes], mac: str, needle: str) -> None:
    node, _ = farm
    res = curl("-w", "\n%{http_code}", f"{node.url}/boot?mac={mac}")
    body, code = res.stdout.decode().rsplit("\n", 1)
    assert code == "200" and needle in body and "sleep" in body and "chain" in body
    res = curl("-w", "%{http_code}", "-o", "/dev/null", f"{node.url}/boot.json?mac={mac}")
    assert res.stdout.decode() == "404"


@pytest.mark.parametrize("mac", ["zz", "52%3A54", "", "01%3A00%3A5e%3A00%3A00%3A01"])
def test_malformed_mac_is_400(farm: tuple[RunningNode, bytes], mac: str) -> None:
    node, _ = farm
    res = curl("-w", "%{http_code}", "-o", "/dev/null", f"{node.url}/boot.json?mac={mac}")
    assert res.stdout.decode() == "400"


def test_head_and_range_reads(farm: tuple[RunningNode, bytes], tmp_path: Path) -> None:
    node, data = farm
    url = f"{node.url}/vdisk/{wait_json(node)['export']}"
    head = curl("-I", url).stdout.decode().lower()
    assert "200" in head.splitlines()[0] and "accept-ranges: bytes" in head
    assert f"content-length: {SIZE}" in head
    res = curl("-D", "-", "-r", "65536-131071", "-o", str(tmp_path / "part"), url)
    headers = res.stdout.decode().lower()
    assert " 206" in headers.splitlines()[0] and f"content-range: bytes 65536-131071/{SIZE}" in headers
    assert (tmp_path / "part").read_bytes() == data[65536:131072]
    curl("-o", str(tmp_path / "all"), url)
    assert hashlib.sha256((tmp_path / "all").read_bytes()).digest() == hashlib.sha256(data).digest()
    keepalive = curl("-v", "-r", "0-511", "-o", "/dev/null", url, "-r", "512-1023", "-o", "/dev/null", url)
    assert b"Re-using existing connection" in keepalive.stderr or b"reusing" in keepalive.stderr.lower()


@pytest.mark.parametrize("rng", [f"{SIZE}-{SIZE + 10}", "0-1,5-9", "9-3", "-0", "x-y"])
def test_bad_ranges_are_416(farm: tuple[RunningNode, bytes], rng: str) -> None:
    node, _ = farm
    url = f"{node.url}/vdisk/{wait_json(node)['export']}"
    res = curl("-w", "%{http_code}", "-o", "/dev/null", "-H", f"Range: bytes={rng}", url)
    assert res.stdout.decode() == "416"


def test_unknown_export_is_404(farm: tuple[RunningNode, bytes]) -> None:
    node, _ = farm
    for token in ("nope.nope", "base"):
        res = curl("-w", "%{http_code}", "-o", "/dev/null", f"{node.url}/vdisk/{token}")
        # "base" by name is the loopback admin path: allowed read-only from 127.0.0.1
        assert res.stdout.decode() == ("200" if token == "base" else "404")


def test_retry_script_tries_the_other_servers_before_this_one(farm: tuple[RunningNode, bytes]) -> None:
    node, _ = farm
    body = curl(f"{node.url}/boot?mac=52%3A54%3A00%3A00%3A00%3A09").stdout.decode()
    chains = [line.split()[3].split("/boot")[0] for line in body.splitlines() if line.startswith("chain --timeout")]
    assert chains == ["http://127.0.0.2:8080", node.url]
