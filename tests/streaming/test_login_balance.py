"""A login burst on one node spreads evenly over the farm (boot storm, issue 6).

Two leaks made 500 logins on n1 end 222/278: the inventory read each peer's
load from the peer's own ``servers.load`` row (written once a heartbeat, so it
lagged what n1 had just assigned to it), and every refresh forgot all of n1's
recent assignments, including the ones made while the flush ran.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from pvsfarm.addr import MacAddress
from pvsfarm.app import App
from pvsfarm.config import NodeConfig
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import Collection, Device, Server, VDisk
from pvsfarm.db.snapshot import MemoryInventory, Snapshot, load_snapshot
from pvsfarm.streaming.journal import Journal, write_batch
from pvsfarm.streaming.login import LoginService
from pvsfarm.views import (BootMethod, BootstrapMode, BootstrapView, CacheType, CopyState, CopyView, DeviceView,
                           ServerState, ServerView, VDiskMode, VDiskView)

NOW = 1_000_000.0
VD = VDiskView("base", 1 << 20, VDiskMode.STANDARD, CacheType.SERVER, "sha256:aa", BootMethod.SANBOOT)
MACS = [MacAddress(bytes((0x52, 0x54, 0, 0x5b, 0, i))) for i in range(40)]


def snapshot(loads: dict[str, int]) -> Snapshot:
    servers = tuple(ServerView(n, "10.0.0.1", 8080, 10809, 69, ServerState.UP, NOW, load) for n, load in loads.items())
    return Snapshot(
        devices={m: DeviceView(m, f"t{i}", None, "default", "base", True) for i, m in enumerate(MACS)},
        vdisks={"base": VD}, servers=servers,
        copies={"base": tuple(CopyView("base", n, f"/s/{n}", "sha256:aa", CopyState.VERIFIED) for n in loads)},
        bootstrap=BootstrapView(tuple(loads), 5000, BootstrapMode.LISTED, 1), secret=b"k" * 32, generation=1)


def test_assignments_made_during_a_flush_still_count_after_the_refresh() -> None:
    inventory = MemoryInventory(snapshot({"n1": 0, "n2": 0}))
    service = LoginService(inventory, lambda: b"k" * 32, Journal(), dead_after_s=5.0)
    assigned = [service.login(m, NOW).server.name for m in MACS[:10]]
    mark = service.flush_mark()  # the node takes the journal: these 10 reach the database
    assigned += [service.login(m, NOW).server.name for m in MACS[10:17]]  # logins while the flush runs
    inventory.replace(snapshot(dict(Counter(assigned[:10]))))  # what the refresh reads back
    service.refreshed(mark)
    assert service.recent == dict(Counter(assigned[10:17]))
    assigned += [service.login(m, NOW).server.name for m in MACS[17:]]
    assert Counter(assigned) == {"n1": 20, "n2": 20}
    service.refreshed()  # no mark: everything is in the loads
    assert service.recent == {} and service.unflushed == []


def test_snapshot_loads_count_open_sessions_not_the_servers_own_row(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = App(dataclasses.replace(NodeConfig(), name="n1"), f"sqlite:///{tmp_path / 'farm.sqlite'}")
    with session_scope(app.sessions()) as s:
        s.add_all([Server(name="n1", address="10.0.0.1", state=ServerState.UP, load=0),
                   Server(name="n2", address="10.0.0.2", state=ServerState.UP, load=0)])  # rows lag
        vdisk = VDisk(name="base", size_bytes=1 << 20, mode=VDiskMode.STANDARD, cache_type=CacheType.SERVER,
                      digest="sha256:aa", boot_method=BootMethod.SANBOOT, file_name="base.img")
        group = Collection(name="default")
        s.add_all([vdisk, group])
        s.add_all([Device(mac=str(m), name=f"t{i}", collection=group, vdisk=vdisk) for i, m in enumerate(MACS[:5])])
    journal = Journal()
    for i, m in enumerate(MACS[:5]):
        journal.open(f"sess{i}", str(m), "base", "n2" if i else "n1", NOW + i)
    journal.end("sess4", NOW + 9)
    with session_scope(app.sessions()) as s:
        write_batch(s, journal.take())
    with session_scope(app.sessions()) as s:
        loads = {v.name: v.load for v in load_snapshot(s).servers}
    app.close()
    assert loads == {"n1": 1, "n2": 3}
