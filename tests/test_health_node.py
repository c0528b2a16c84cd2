"""Issue 5 on one real node (loopback, no DHCP): a TFTP broken through the fault
endpoint is caught by the node's own self-check, shown in ``server list`` and
``/health``, and cleared after the fault is lifted."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nodes import RunningNode, admin, start_node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, str]]:
    tmp = tmp_path_factory.mktemp("health")
    db = f"sqlite:///{tmp / 'farm.sqlite'}"
    running = start_node(tmp, "h1", db, admin_faults=True)
    try:
        yield running, db
    finally:
        running.stop()


def post_fault(node: RunningNode, state: str, service: str = "tftp") -> tuple[int, Any]:
    data = json.dumps({"service": service, "state": state}).encode()
    req = urllib.request.Request(f"{node.url}/admin/fault", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def listed_health(db: str, name: str) -> str:
    rows = json.loads(admin(db, "server", "list", "--json"))
    return next(r["health"] for r in rows if r["name"] == name)


def wait_for(check: Callable[[], Any], timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout_s} s")


def test_fault_is_caught_by_the_self_check_and_cleared(node: tuple[RunningNode, str]) -> None:
    running, db = node
    wait_for(lambda: listed_health(db, "h1") == "ok", 5)
    assert running.get_json("/health")["health"] == "ok"

    assert post_fault(running, "down") == (200, {"service": "tftp", "state": "down"})
    took = wait_for(lambda: "tftp" in listed_health(db, "h1"), 6)
    assert listed_health(db, "h1") == "tftp down: timeout"
    page = running.get_json("/health")
    assert page["status"] == "degraded" and page["failing"] == ["tftp"] and page["health"] == "tftp down: timeout"
    print(f"\nTFTP fault seen in `server list` after {took:.2f} s")

    assert post_fault(running, "up")[0] == 200
    back = wait_for(lambda: listed_health(db, "h1") == "ok", 6)
    assert running.get_json("/health")["status"] == "ok"
    print(f"recovery seen in `server list` after {back:.2f} s")
    log = running.log.read_text()
    assert "health: tftp down: timeout" in log and "health: ok again" in log
    assert "dhcp: paused" not in log  # DHCP is off on this node: nothing to pause
    assert "tftp: sent 'boot.ipxe'" not in log  # the probes' transfers are not logged


def test_fault_endpoint_refuses_bad_requests(node: tuple[RunningNode, str]) -> None:
    running, _ = node
    assert post_fault(running, "sideways")[0] == 400
    assert post_fault(running, "down", service="dns")[0] == 400


def test_fault_endpoint_is_off_by_default(tmp_path: Path) -> None:
    other = start_node(tmp_path, "h2", f"sqlite:///{tmp_path / 'farm.sqlite'}")
    try:
        status, body = post_fault(other, "down")
        assert status == 403 and "admin_faults" in body["error"]
        assert other.get_json("/health")["health"] == "ok"
    finally:
        other.stop()
