"""The farm list handed out at login follows liveness (it is cached between logins)."""

from __future__ import annotations

import dataclasses

from pvsfarm.addr import MacAddress
from pvsfarm.db.snapshot import MemoryInventory, Snapshot
from pvsfarm.streaming.journal import Journal
from pvsfarm.streaming.login import LoginService
from pvsfarm.views import (BootMethod, BootstrapMode, BootstrapView, CacheType, CopyState, CopyView, DeviceView,
                           ServerState, ServerView, VDiskMode, VDiskView)

NOW = 1_000_000.0
VD = VDiskView("base", 1 << 20, VDiskMode.STANDARD, CacheType.SERVER, "sha256:aa", BootMethod.SANBOOT)
MAC = MacAddress.parse("52:54:00:5c:00:01")


def snapshot(beats: dict[str, float], mode: BootstrapMode = BootstrapMode.LISTED) -> Snapshot:
    servers = tuple(ServerView(n, "10.0.0.1", 8080, 10809, 69, ServerState.UP, at, 0) for n, at in beats.items())
    return Snapshot(
        devices={MAC: DeviceView(MAC, "t0", None, "default", "base", True)}, vdisks={"base": VD}, servers=servers,
        copies={"base": tuple(CopyView("base", n, f"/s/{n}", "sha256:aa", CopyState.VERIFIED) for n in beats)},
        bootstrap=BootstrapView(("n2", "n1", "n3"), 5000, mode, 1), secret=b"k" * 32, generation=1)


def farm(service: LoginService, now: float) -> list[str]:
    return [s.name for s in service.login(MAC, now).farm]


def test_farm_drops_a_server_once_its_heartbeat_ages_out_between_logins() -> None:
    inventory = MemoryInventory(snapshot({"n1": NOW, "n2": NOW - 4.0, "n3": NOW - 20.0}))
    service = LoginService(inventory, lambda: b"k" * 32, Journal(), dead_after_s=5.0)
    assert farm(service, NOW) == ["n2", "n1"]  # bootstrap order; n3 is dead
    assert farm(service, NOW + 1.0) == ["n2", "n1"]  # n2 is 5.0 s old: still live (<=)
    assert farm(service, NOW + 1.5) == ["n1"]  # same servers tuple, n2 aged out
    assert farm(service, NOW) == ["n2", "n1"]  # a clock stepping back is answered afresh


def test_farm_follows_a_refreshed_inventory() -> None:
    inventory = MemoryInventory(snapshot({"n1": NOW, "n2": NOW}))
    service = LoginService(inventory, lambda: b"k" * 32, Journal(), dead_after_s=5.0)
    assert farm(service, NOW) == ["n2", "n1"]
    refreshed = snapshot({"n1": NOW, "n2": NOW, "n3": NOW})
    inventory.replace(dataclasses.replace(refreshed, servers=(dataclasses.replace(refreshed.servers[0],
                                                                                  state=ServerState.DRAINING),
                                                              *refreshed.servers[1:])))
    assert farm(service, NOW) == ["n2", "n3"]
    inventory.replace(snapshot({"n1": NOW, "n2": NOW, "n3": NOW}, BootstrapMode.LIVE))
    assert farm(service, NOW) == ["n1", "n2", "n3"]  # live mode: by name
