"""Drain moves a node's targets away gently: one session per heartbeat, each
target logs in again and lands on another node, reads and writes intact."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos_farm import Farm, Target, mac_of
from tests.conftest import have

pytestmark = [pytest.mark.postgres, pytest.mark.skipif(not have("initdb") and not Path(
    "/usr/lib/postgresql").exists(), reason="needs PostgreSQL")]
TARGETS = 12


async def scenario(farm: Farm) -> tuple[list[Target], str, float]:
    urls = await farm.ready()
    fleet = [Target(mac=mac_of(i), disk=farm.disk, digests=farm.digests, logins=[], rng=random.Random(i))
             for i in range(TARGETS)]
    await asyncio.gather(*(t.attach(urls) for t in fleet))
    stop = asyncio.Event()
    runs = [asyncio.create_task(t.run(stop, 0.05)) for t in fleet]
    await asyncio.sleep(1.0)
    busiest, _ = Counter(t.server for t in fleet).most_common(1)[0]
    drained_at = time.monotonic()
    await farm.cli("server", "drain", str(busiest))
    deadline = drained_at + 30
    while time.monotonic() < deadline and any(t.server == busiest for t in fleet):
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*runs)
    await asyncio.gather(*(t.finish() for t in fleet))
    return fleet, str(busiest), drained_at


def test_drain_moves_targets_gently(tmp_path: Path) -> None:
    with Farm(tmp_path, devices=TARGETS, spares=0) as farm:
        fleet, drained, drained_at = asyncio.run(scenario(farm))
        log = farm.nodes[drained].log.read_text()
    assert [t.error for t in fleet if t.error] == []
    assert sum(t.wrong_reads for t in fleet) == 0 and sum(t.lost_writes for t in fleet) == 0
    assert all(t.server != drained for t in fleet), "every target left the drained node"
    moved = [t for t in fleet if any(s == drained for _, s in t.switches)]
    assert moved, "the drained node was serving targets"
    for t in moved:  # once moved, never back on the drained node
        after = [server for at, server in t.switches if at > drained_at]
        assert after and drained not in after, (t.mac, t.switches, drained_at)
    # gently: one session per heartbeat round, not all at once
    assert log.count("draining: moved session") >= len(moved)
