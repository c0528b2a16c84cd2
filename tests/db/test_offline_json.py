"""The offline cache's snapshot JSON: round trip, and the devices part re-encoded only when it changed."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

from pvsfarm.addr import MacAddress
from pvsfarm.db.offline import snapshot_from_json, snapshot_to_json
from pvsfarm.db.snapshot import Snapshot
from pvsfarm.views import (BootMethod, BootstrapMode, BootstrapView, CacheType, CopyState, CopyView, DeviceView,
                           ServerState, ServerView, VDiskMode, VDiskView)

MACS = [MacAddress(bytes((0x52, 0x54, 0, 0x5d, 0, i))) for i in range(5)]


def snapshot(devices: dict[MacAddress, DeviceView], load: int = 0) -> Snapshot:
    return Snapshot(
        devices=devices,
        vdisks={"base": VDiskView("base", 1 << 20, VDiskMode.STANDARD, CacheType.SERVER, "sha256:aa",
                                  BootMethod.SANBOOT)},
        servers=(ServerView("n1", "10.0.0.1", 8080, 10809, 69, ServerState.UP, 1000.5, load),),
        copies={"base": (CopyView("base", "n1", "/s/base", "sha256:aa", CopyState.VERIFIED),)},
        bootstrap=BootstrapView(("n1",), 5000, BootstrapMode.LISTED, 3), secret=b"k" * 32, generation=7)


def test_round_trip_follows_every_change() -> None:
    devices = {m: DeviceView(m, f"t{i}", IPv4Address("10.0.0.9") if i == 2 else None, "default",
                             "base" if i else None, i != 4) for i, m in enumerate(MACS)}
    first = snapshot(devices)
    assert snapshot_from_json(snapshot_to_json(first)) == first
    same_devices = snapshot(devices, load=5)  # a heartbeat later: same devices dict, servers changed
    assert snapshot_from_json(snapshot_to_json(same_devices)) == same_devices
    fewer = dataclasses.replace(first, devices={MACS[0]: devices[MACS[0]]})  # a new generation's dict
    assert snapshot_from_json(snapshot_to_json(fewer)) == fewer
    assert snapshot_from_json(snapshot_to_json(first)) == first
