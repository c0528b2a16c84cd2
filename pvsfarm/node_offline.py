"""How a node lives through a database outage (mixed into `Node`).

- At start, an unreachable database is not fatal when the offline cache has
  a copy of the inventory: the node serves from it and says so.
- After each good refresh the inventory is saved to the offline cache.
- While the database is down, session events are journaled in the offline
  cache, and peers' liveness comes from probing their ``/health`` (nobody can
  write heartbeats), so assignment still only picks servers that answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import aiohttp

from pvsfarm.db.offline import OfflineCache
from pvsfarm.errors import DatabaseUnavailable
from pvsfarm.streaming.journal import Journal
from pvsfarm.views import ServerState

if TYPE_CHECKING:
    from pvsfarm.node import Node

log = logging.getLogger("pvsfarm.node")
SAVE_EVERY_S = 10.0
"""Servers' loads/heartbeats change every second; the cache needs them only roughly."""
PROBE_TIMEOUT_S = 0.5


class OfflineMixin:
    _offline_cache: OfflineCache | None = None
    _saved: tuple[int, float] = (-2, 0.0)

    @property
    def offline_cache(self: Node) -> OfflineCache:  # type: ignore[misc]
        if self._offline_cache is None:
            self._offline_cache = OfflineCache(self.cfg.offline_cache_path)
        return self._offline_cache

    async def start_inventory(self: Node) -> None:  # type: ignore[misc]
        pending = self.offline_cache.take_journal()
        if pending is not None:
            self.journal.restore(pending)  # sessions journaled before a restart during an outage
        try:
            await asyncio.to_thread(self.register)
        except DatabaseUnavailable as exc:
            loaded = self.offline_cache.load_snapshot()
            if loaded is None:
                raise DatabaseUnavailable(f"{exc}; and no offline cache at {self.offline_cache.path}") from exc
            snapshot, saved_at = loaded
            self.inventory.replace(snapshot)
            self.online = False
            self.say(f"database unavailable: serving from the offline cache saved "
                     f"{time.time() - saved_at:.0f} s ago ({self.offline_cache.path})")
            return
        self.save_offline(force=True)

    def save_offline(self: Node, force: bool = False) -> None:  # type: ignore[misc]
        snapshot = self.inventory.snapshot
        gen, at = self._saved
        now = time.time()
        if force or snapshot.generation != gen or now - at > SAVE_EVERY_S:
            self.offline_cache.save_snapshot(snapshot, now)
            self._saved = (snapshot.generation, now)

    async def while_offline(self: Node) -> None:  # type: ignore[misc]
        """One round of offline upkeep: persist the journal, refresh peers' liveness by probing."""
        batch = self.journal.take()
        self.journal.restore(batch)
        await asyncio.to_thread(self.offline_cache.save_journal, batch)
        await self.probe_peers()

    def journal_written_back(self: Node) -> None:  # type: ignore[misc]
        """The database has the outage's events now: drop their saved copy, or the next start
        replays it and its session inserts break the token's unique key on every flush — the
        node would never heartbeat again (found by the e2e tests: any restart after an outage)."""
        self.offline_cache.save_journal(Journal())

    async def probe_peers(self: Node) -> None:  # type: ignore[misc]
        snapshot = self.inventory.snapshot
        now = time.time()
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            answers = await asyncio.gather(*(self._probe(client, s) for s in snapshot.servers))
        servers = tuple(
            dataclasses.replace(s, heartbeat_at=now, state=ServerState.UP) if ok and s.state is not ServerState.DRAINING
            else s
            for s, ok in zip(snapshot.servers, answers)
        )
        self.inventory.replace(dataclasses.replace(snapshot, servers=servers))

    async def _probe(self: Node, client: aiohttp.ClientSession, server) -> bool:  # type: ignore[misc,no-untyped-def]
        if server.name == self.cfg.name:
            return True
        try:
            async with client.get(f"http://{server.address}:{server.http_port}/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False
