"""Issue 5's chaos test: a three-node farm on a shared store loses its busiest node
(``kill -9``), then its database for 20 s, then a node is drained — while 60
targets stream, write and check every byte, and new targets keep booting.

The scenario lives in `tests.chaos_farm` (shared with benchmarks/failover_bench.py).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos_farm import DEAD_AFTER_S, NODES, Farm, run_chaos
from tests.nodes import admin

pytestmark = [pytest.mark.chaos, pytest.mark.postgres]
TARGETS, OUTAGE_BOOTS, DRAIN_BOOTS = 60, 20, 10


def test_chaos(tmp_path: Path) -> None:
    lines: list[str] = []
    with Farm(tmp_path, TARGETS, OUTAGE_BOOTS + DRAIN_BOOTS) as farm:
        out = asyncio.run(asyncio.wait_for(
            run_chaos(farm, targets=TARGETS, outage_boots=OUTAGE_BOOTS, drain_boots=DRAIN_BOOTS,
                      say=lines.append), 150))
        servers = {s["name"]: s for s in json.loads(admin(farm.pg.url, "server", "list", "--json"))}
    story = "\n".join(lines)
    print(story)

    # Every target kept running; every byte read was right; no acknowledged write was lost.
    assert [t.error for t in out.targets if t.error] == [], story
    assert sum(t.wrong_reads for t in out.targets) == 0
    assert sum(t.lost_writes for t in out.targets) == 0
    assert sum(t.writes_acked for t in out.targets) >= TARGETS * 3
    assert sum(t.reads_ok for t in out.targets) > TARGETS * 50

    # The busiest node's targets all failed over (fast), spread over the survivors, caches intact.
    moved = [t for t in out.targets if any(s == out.killed for _, s in t.switches)]
    assert moved and not out.not_recovered, story
    assert len(out.failover_s) == len(moved)
    assert max(out.failover_s.values()) < 3.0, sorted(round(v, 3) for v in out.failover_s.values())
    assert not [x for x in out.logins if x.cache_lost]
    spread = Counter(t.server for t in moved)
    assert set(spread) == set(NODES) - {out.killed} and min(spread.values()) >= len(moved) // 4, spread

    # 100% of new boots during the database outage, and their sessions written back afterwards.
    assert [b.error for b in out.outage_boots if not b.ok] == [], story
    assert all(out.outage[0] <= b.started < out.outage[1] for b in out.outage_boots)
    assert out.writeback_s is not None, f"{len(out.written_back)}/{len(out.outage_boots)} sessions written back"
    assert out.written_back == {b.session: b.server for b in out.outage_boots}

    # No assignment to a dead or drained server, or to one without a verified copy.
    assert {x.server for x in out.logins} <= out.verified == set(NODES)
    after_kill = [x for x in out.logins if x.t > out.kill_t]
    to_dead = [(round(x.t - out.kill_t, 2), x.mac, "resume" if x.resumed else "new") for x in after_kill
               if x.server == out.killed]
    assert after_kill and not to_dead, f"assigned to {out.killed} after its kill: {to_dead}"
    # New boots came while the farm's heartbeats still called the killed node live (nodes learn
    # it from the failing-over targets; it was the least loaded once they had moved away).
    assert any(not x.resumed for x in after_kill if x.t < out.kill_t + DEAD_AFTER_S)
    after_drain = [x for x in out.logins if x.t > out.drain_t]
    # new boots, plus the drained node's targets it moves away (resumed logins)
    assert len([x for x in after_drain if not x.resumed]) == DRAIN_BOOTS, story
    assert all(b.ok for b in out.drain_boots), story
    assert out.drained not in {x.server for x in after_drain}
    assert servers[out.drained]["state"] == "draining"
    assert servers[out.killed]["state"] == "dead"
