"""``pvsfarm node``: one asyncio process serving the farm's protocols.

Starts the protocol servers this node's config enables, registers the node
in the database and heartbeats. DHCP stays off unless the config names an
interface (a default node never answers DHCP on a network by surprise).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy import select

from pvsfarm.admin.farm import ensure_server
from pvsfarm.app import App
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import Server, utcnow
from pvsfarm.errors import DatabaseUnavailable, PvsfarmError
from pvsfarm.views import ServerState

log = logging.getLogger("pvsfarm.node")


@dataclass
class Node:
    app: App
    say: Callable[[str], None] = print
    runners: list[Any] = field(default_factory=list)
    closers: list[Callable[[], Any]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def cfg(self):  # type: ignore[no-untyped-def]
        return self.app.config

    def register(self) -> None:
        cfg = self.cfg
        with session_scope(self.app.sessions()) as s:
            server = ensure_server(s, cfg.name, cfg.address, http_port=cfg.http.listen_port,
                                   nbd_port=cfg.nbd.listen_port, tftp_port=cfg.tftp.listen_port)
            server.state = ServerState.UP
            server.heartbeat_at = utcnow()

    def heartbeat(self, state: ServerState | None = None) -> None:
        with session_scope(self.app.sessions()) as s:
            server = s.scalar(select(Server).where(Server.name == self.cfg.name))
            if server is None:
                return
            server.heartbeat_at = utcnow()
            if state is not None:
                server.state = state

    async def start_http(self) -> None:
        cfg = self.cfg.http
        webapp = web.Application()
        webapp.router.add_get("/health", self._health)
        runner = web.AppRunner(webapp, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, cfg.listen_address, cfg.listen_port)
        await site.start()
        self.runners.append(runner)
        self.say(f"http: listening on {cfg.listen_address}:{cfg.listen_port} (login API, bootstrap)")

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"node": self.cfg.name, "status": "ok"})

    async def heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.to_thread(self.heartbeat)
            except DatabaseUnavailable as exc:
                log.warning("heartbeat failed: %s", exc)
            try:
                await asyncio.wait_for(self.stopping.wait(), self.cfg.heartbeat_interval_s)
            except TimeoutError:
                pass

    async def run(self) -> None:
        cfg = self.cfg
        self.say(f"pvsfarm node {cfg.name!r}: database {self.app.db_url.split('@')[-1]}")
        self.say(f"data directory: {cfg.data_path} (store {cfg.store_path})")
        cfg.store_path.mkdir(parents=True, exist_ok=True)
        cfg.tftp_root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.register)
        if cfg.http.enabled:
            await self.start_http()
        if cfg.dhcp.interface is None:
            self.say("dhcp: off (no dhcp.interface in the config)")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        self.say("node ready")
        try:
            await self.heartbeat_loop()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for close in reversed(self.closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result
        for runner in self.runners:
            await runner.cleanup()
        try:
            await asyncio.to_thread(self.heartbeat, ServerState.DOWN)
        except PvsfarmError as exc:
            log.warning("could not mark the node down: %s", exc)
        self.say("node stopped")


def run_node(app: App) -> None:
    """Run a node until SIGINT/SIGTERM, on uvloop where installed."""
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    node = Node(app, say=lambda line: print(line, flush=True))
    if uvloop is not None:
        uvloop.run(node.run())
    else:
        asyncio.run(node.run())
