"""The audit's checks as a pure function: a healthy farm is clean; each fault names exactly itself."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

import pvsfarm.admin.audit as audit_mod
from pvsfarm.addr import MacAddress
from pvsfarm.admin.audit import DatabaseFacts, FarmFacts, MediaFacts, NodeFacts, Severity, audit, is_severe
from pvsfarm.views import (
    BootMethod,
    BootstrapMode,
    BootstrapView,
    CacheType,
    CopyState,
    CopyView,
    DeviceView,
    ServerState,
    ServerView,
    VDiskMode,
    VDiskView,
)

NOW = 1_000_000.0
NET = IPv4Network("10.0.0.0/24")
DIGEST = "sha256:" + "ab" * 32


def node(name: str, **kw: object) -> NodeFacts:
    server = ServerView(name, f"10.0.0.{ord(name[-1]) % 200}", 8080, 10809, 69, ServerState.UP, NOW - 1, 0, "ok")
    fields = {"dhcp_subnet": NET, "offline_cache_at": NOW - 5, "inventory_generation": 7, "store_shared": True}
    fields.update(kw)
    return NodeFacts(server, **fields)  # type: ignore[arg-type]


def healthy() -> FarmFacts:
    vdisk = VDiskView("win", 1 << 20, VDiskMode.STANDARD, CacheType.SERVER, DIGEST, BootMethod.SANBOOT)
    copies = tuple(CopyView("win", s, f"/store/{s}/win.img", DIGEST, CopyState.VERIFIED) for s in ("a", "b"))
    devices = tuple(DeviceView(MacAddress.parse(f"52:54:00:00:00:0{i}"), f"t{i}", IPv4Address(f"10.0.0.{50 + i}"),
                               "lab", "win", True) for i in range(2))
    return FarmFacts(now=NOW, nodes=(node("a"), node("b"), node("c")),
                     bootstrap=BootstrapView(("a", "b"), 5000, BootstrapMode.LISTED, 3), vdisks=(vdisk,),
                     copies=copies, devices=devices, generation=7, generation_changed_at=NOW - 600,
                     database=DatabaseFacts("postgresql", True),
                     media=(MediaFacts(1, "iso", 3, ("a", "b")),))


def with_node(facts: FarmFacts, name: str, **kw: object) -> FarmFacts:
    nodes = tuple(node(name, **kw) if n.server.name == name else n for n in facts.nodes)
    return dataclasses.replace(facts, nodes=nodes)


def with_server(facts: FarmFacts, name: str, **kw: object) -> FarmFacts:
    nodes = tuple(dataclasses.replace(n, server=dataclasses.replace(n.server, **kw)) if n.server.name == name else n
                  for n in facts.nodes)
    return dataclasses.replace(facts, nodes=nodes)


def test_healthy_farm_is_clean() -> None:
    assert audit(healthy()) == []
    assert not is_severe(audit(healthy()))


FAULTS: dict[str, tuple[Callable[[FarmFacts], FarmFacts], set[tuple[str, str]]]] = {
    # One live node: its consequences (the bootstrap's other server, DHCP) are named too.
    "one live node": (lambda f: with_server(with_server(f, "b", state=ServerState.DOWN), "c", state=ServerState.DOWN),
                      {("live-nodes", "farm"), ("bootstrap-dead", "server b"), ("dhcp-redundancy", "collection lab")}),
    "bootstrap of one": (lambda f: dataclasses.replace(f, bootstrap=dataclasses.replace(f.bootstrap, servers=("a",))),
                         {("bootstrap-size", "bootstrap v3")}),
    "bootstrap names a dead server": (lambda f: with_server(f, "b", heartbeat_at=NOW - 60),
                                      {("bootstrap-dead", "server b")}),
    "bootstrap names a stopped server": (lambda f: with_server(f, "a", state=ServerState.DOWN),
                                         {("bootstrap-dead", "server a")}),
    "bootstrap names a drained server": (lambda f: with_server(f, "b", state=ServerState.DRAINING),
                                         {("bootstrap-drained", "server b")}),
    "bootstrap server lacks a copy": (lambda f: dataclasses.replace(f, copies=f.copies[:1] + (
        CopyView("win", "c", "/p", DIGEST, CopyState.VERIFIED),)), {("bootstrap-copies", "server b")}),
    "dhcp on one node": (lambda f: with_node(with_node(f, "b", dhcp_subnet=None), "c", dhcp_subnet=None),
                         {("dhcp-redundancy", "collection lab")}),
    "dhcp subnet misses the reservations": (
        lambda f: with_node(with_node(f, "b", dhcp_subnet=IPv4Network("10.9.0.0/24")), "c",
                            dhcp_subnet=IPv4Network("10.9.0.0/24")), {("dhcp-redundancy", "collection lab")}),
    "reservations differ": (lambda f: with_node(f, "c", inventory_generation=6), {("dhcp-reservations", "server c")}),
    "generation not reported": (lambda f: with_node(f, "c", inventory_generation=None),
                                {("dhcp-reservations", "server c")}),
    "health fails while dhcp answers": (lambda f: with_server(f, "c", health="tftp down: timeout"),
                                        {("health-dhcp", "server c")}),
    "one verified copy": (lambda f: dataclasses.replace(f, copies=f.copies[:1] + (dataclasses.replace(
        f.copies[1], state=CopyState.COPYING),)), {("vdisk-copies", "vdisk win"), ("bootstrap-copies", "server b")}),
    "stale copy": (lambda f: dataclasses.replace(f, copies=f.copies + (
        CopyView("win", "c", "/p", "sha256:old", CopyState.STALE),)), {("vdisk-stale", "vdisk win on c")}),
    "offline cache old": (lambda f: with_node(f, "c", offline_cache_at=NOW - 3600), {("offline-cache", "server c")}),
    "offline cache missing": (lambda f: with_node(f, "c", offline_cache_at=None), {("offline-cache", "server c")}),
    "no standby": (lambda f: dataclasses.replace(f, database=DatabaseFacts("postgresql", False)),
                   {("db-standby", "database")}),
    "embedded sqlite": (lambda f: dataclasses.replace(f, database=DatabaseFacts("sqlite", None)),
                        {("db-standby", "database")}),
    "write cache on a local store": (lambda f: with_node(f, "a", store_shared=False),
                                     {("write-cache-local", "vdisk win")}),
    "iso lists a removed server": (lambda f: dataclasses.replace(f, media=(MediaFacts(1, "iso", 3, ("a", "gone")),)),
                                   {("issued-media", "iso #1")}),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_named_exactly(fault: str) -> None:
    make, expected = FAULTS[fault]
    found = {(f.check, f.object) for f in audit(make(healthy()))}
    assert found == expected


def test_severity_and_exit_rule() -> None:
    db_only = audit(dataclasses.replace(healthy(), database=DatabaseFacts("sqlite", None)))
    assert [f.severity for f in db_only] == [Severity.ADVICE] and not is_severe(db_only)
    dead = audit(with_server(healthy(), "b", heartbeat_at=NOW - 60))
    assert dead[0].severity is Severity.CRITICAL and is_severe(dead)  # bootstrap left with one usable server
    drained_of_three = dataclasses.replace(healthy(), bootstrap=dataclasses.replace(
        healthy().bootstrap, servers=("a", "b", "c")), copies=healthy().copies + (
        CopyView("win", "c", "/p", DIGEST, CopyState.VERIFIED),))
    out = audit(with_server(drained_of_three, "c", state=ServerState.DRAINING))
    assert [(f.check, f.severity) for f in out] == [("bootstrap-drained", Severity.WARNING)]


def test_reservation_skew_is_tolerated_right_after_a_change() -> None:
    facts = dataclasses.replace(with_node(healthy(), "c", inventory_generation=6), generation_changed_at=NOW - 2)
    assert audit(facts) == []


def test_unused_vdisk_with_one_copy_is_a_warning_and_live_mode_bootstrap_of_one_too() -> None:
    facts = dataclasses.replace(healthy(), devices=())
    facts = dataclasses.replace(facts, copies=facts.copies[:1],
                                bootstrap=BootstrapView(("a",), 5000, BootstrapMode.LIVE, 3))
    assert {(f.check, f.severity) for f in audit(facts)} == {("vdisk-copies", Severity.WARNING),
                                                            ("bootstrap-size", Severity.WARNING)}


def test_checks_module_is_pure() -> None:
    tree = ast.parse(Path(audit_mod.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"sqlalchemy", "asyncio", "socket", "time", "aiohttp"}
