"""``pvsfarm node``: one asyncio process serving the farm's protocols.

HTTP (bootstrap, login API, sanboot range reads), NBD (vDisk streaming),
TFTP (iPXE loaders and the bootstrap) and — only when the config names an
interface — DHCP. Hot paths read the in-memory inventory; one background
loop heartbeats, flushes the session journal and re-reads the inventory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import select

from pvsfarm.admin.farm import ensure_server, record_store
from pvsfarm.admin.node_facts import report_facts
from pvsfarm.app import App
from pvsfarm.config import NodeConfig
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import Server, utcnow
from pvsfarm.db.notify import Listener
from pvsfarm.db.snapshot import MemoryInventory, load_snapshot, open_sessions_by_server
from pvsfarm.node_health import HealthMixin
from pvsfarm.node_offline import OfflineMixin
from pvsfarm.errors import DatabaseUnavailable, PvsfarmError
from pvsfarm.streaming.exports import Exports
from pvsfarm.streaming.http_api import HttpApi
from pvsfarm.streaming.http_fast import start_fast_boot
from pvsfarm.streaming.journal import Journal, write_batch
from pvsfarm.store.replicate import add_peer_routes, replicator_for
from pvsfarm.streaming.login import LoginService
from pvsfarm.views import ServerState

log = logging.getLogger("pvsfarm.node")
IPXE_LOADERS = (Path("/usr/lib/ipxe/undionly.kpxe"), Path("/usr/lib/ipxe/ipxe.efi"))
"""Debian's ipxe package; copied into the TFTP root when missing there."""
BOOTSTRAP_NAMES = ("boot.ipxe", "bootstrap.ipxe")
GIL_SWITCH_INTERVAL_S = 0.001
"""CPython's default is 5 ms; see run_node (login p99 under load, benchmarks/login_bench.py)."""


@dataclass
class Node(OfflineMixin, HealthMixin):
    app: App
    say: Callable[[str], None] = print
    inventory: MemoryInventory = field(default_factory=MemoryInventory)
    journal: Journal = field(default_factory=Journal)
    closers: list[Callable[[], Any]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    online: bool = True

    def __post_init__(self) -> None:
        cfg = self.cfg
        secret = lambda: self.inventory.snapshot.secret  # noqa: E731
        self.login = LoginService(self.inventory, secret, self.journal, cfg.dead_after_s,
                                  shared_store=cfg.store.shared)
        self.exports = Exports(self.inventory, secret, cfg.name, cfg.store_path / "writecache", self.journal,
                               time.time, admin_from_loopback_only=cfg.nbd.admin_from_loopback_only,
                               dead_after_s=cfg.dead_after_s)
        self.http = HttpApi(self.inventory, self.login, self.exports, cfg.name,
                            f"http://{cfg.address}:{cfg.http.listen_port}")

    @property
    def cfg(self) -> NodeConfig:
        return self.app.config

    # -- database side (runs in a worker thread) ---------------------------

    def register(self) -> None:
        cfg = self.cfg
        with session_scope(self.app.sessions()) as s:
            server = ensure_server(s, cfg.name, cfg.address, http_port=cfg.http.listen_port,
                                   nbd_port=cfg.nbd.listen_port, tftp_port=cfg.tftp.listen_port)
            server.state, server.heartbeat_at = ServerState.UP, utcnow()
            record_store(s, server, str(cfg.store_path.resolve()), cfg.store.shared)
            self.inventory.replace(load_snapshot(s))

    def sync(self, state: ServerState | None = None) -> None:
        """Heartbeat + journal flush + inventory refresh, in one transaction."""
        mark = self.login.flush_mark()
        batch = self.journal.take()
        try:
            with session_scope(self.app.sessions()) as s:
                write_batch(s, batch)
        except BaseException:
            self.journal.restore(batch)
            raise
        with session_scope(self.app.sessions()) as s:
            server = s.scalar(select(Server).where(Server.name == self.cfg.name))
            loads = open_sessions_by_server(s)
            if server is not None:
                server.heartbeat_at = utcnow()
                server.load = loads.get(server.id, 0)
                server.health = self.health.summary()
                if state is not None:
                    server.state = state
                elif server.state is ServerState.DOWN:
                    server.state = ServerState.UP  # e.g. started while the database was down
            s.flush()
            snapshot = load_snapshot(s, self.inventory.snapshot, loads)
            if server is not None:
                report_facts(server, self.cfg, snapshot.generation, self._saved[1])
        self.inventory.replace(snapshot)
        self.login.refreshed(mark)

    async def sync_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.to_thread(self.sync)
                await asyncio.to_thread(self.save_offline)
                self.move_if_draining()
                if not self.online:
                    self.online = True
                    await asyncio.to_thread(self.journal_written_back)
                    self.say("database reachable again: journal written back, inventory refreshed")
            except (DatabaseUnavailable, PvsfarmError) as exc:
                if self.online:
                    self.online = False
                    self.say(f"database unavailable, serving from memory and the offline cache: {exc}")
                await self.while_offline()
            except Exception:  # noqa: BLE001 - the sync loop must outlive any one bad round
                log.exception("inventory sync failed; retrying")
            await self._pause(self.cfg.heartbeat_interval_s)

    def move_if_draining(self) -> None:
        """Drained: move one target away per round (gently, not all at once)."""
        me = next((s for s in self.inventory.servers() if s.name == self.cfg.name), None)
        if me is not None and me.state is ServerState.DRAINING:
            moved = self.exports.move_one_session()
            if moved:
                self.say(f"draining: moved session {moved[:8]} to another server")

    async def _pause(self, seconds: float) -> None:
        """Sleep until the next round, the node stops, or a NOTIFY wakes us."""
        waits = [asyncio.ensure_future(self.stopping.wait()), asyncio.ensure_future(self.wake.wait())]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        self.wake.clear()

    def start_listener(self) -> None:
        if self.app.engine.dialect.name != "postgresql":
            return
        loop = asyncio.get_running_loop()
        listener = Listener(self.app.engine, lambda: loop.call_soon_threadsafe(self.wake.set))
        listener.start()
        self.closers.append(listener.stop)

    # -- protocol servers --------------------------------------------------

    async def start_http(self) -> None:
        cfg = self.cfg.http
        webapp = web.Application()
        webapp.router.add_get("/health", self._health)
        self.http.routes(webapp)
        self.add_admin_routes(webapp)
        add_peer_routes(webapp, self.inventory, self.cfg.name, lambda: self.inventory.snapshot.secret)
        runner = web.AppRunner(webapp, access_log=None)
        await runner.setup()
        assert runner.server is not None
        # GET /boot is answered in front of aiohttp on the same port; the rest is aiohttp's (http_fast)
        stop_fast = await start_fast_boot(self.http.boot_answer, runner.server, cfg.listen_address, cfg.listen_port)
        await self.add_admin_site(runner)
        self.closers += [runner.cleanup, stop_fast]
        self.say(f"http: listening on {cfg.listen_address}:{cfg.listen_port} (login API, bootstrap, sanboot)")

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"node": self.cfg.name, "database": self.online,
                                  "sessions": self.exports.open_sessions(), **self.health_fields()})

    async def start_nbd(self) -> None:
        from pvsfarm.streaming.nbd.config import NbdConfig as NbdServerConfig
        from pvsfarm.streaming.nbd.server import check_tcp_congestion, start_nbd_server

        from pvsfarm.streaming.nbd.handoff import WorkerPool

        cfg = self.cfg.nbd
        check_tcp_congestion(cfg.tcp_congestion)  # before any worker starts
        server_cfg = NbdServerConfig(max_request_bytes=cfg.max_request_bytes, busy_poll_us=cfg.busy_poll_us,
                                     send_buffer_bytes=cfg.send_buffer_bytes, tcp_congestion=cfg.tcp_congestion,
                                     notsent_lowat_bytes=cfg.notsent_lowat_bytes)
        pool = None
        if cfg.workers > 0:
            pool = WorkerPool(cfg.workers, server_cfg)
            pool.start()
            self.nbd_pool = pool
            self.closers.append(pool.close)
            if not await pool.wait_ready():
                self.say("nbd: workers slow to start; the node serves connections itself meanwhile")
        server = await start_nbd_server(self.exports, cfg.listen_address, cfg.listen_port,
                                        config=server_cfg, pool=pool)
        self.closers.append(server.close)
        served_by = f"{cfg.workers} worker processes" if pool is not None else "this process (nbd.workers: 0)"
        congestion = cfg.tcp_congestion or "the system's"
        self.say(f"nbd: listening on {cfg.listen_address}:{cfg.listen_port} (transmission in {served_by}; "
                 f"TCP congestion control {congestion})")

    def bootstrap_file(self, name: str, _peer: tuple[str, int]) -> bytes | None:
        return self.http.bootstrap_text().encode() if name.lstrip("/") in BOOTSTRAP_NAMES else None

    async def start_tftp(self) -> None:
        from pvsfarm.bootstrap.tftp.server import TftpSettings, start_tftp_server

        cfg, root = self.cfg.tftp, self.cfg.tftp_root
        for loader in IPXE_LOADERS:
            if loader.exists() and not (root / loader.name).exists():
                shutil.copyfile(loader, root / loader.name)
        server = await start_tftp_server(TftpSettings(root=root, host=cfg.listen_address, port=cfg.listen_port,
                                                      max_transfers=cfg.max_transfers,
                                                      busy_poll_us=cfg.busy_poll_us), self.bootstrap_file)
        self.closers.append(server.close)
        self.tftp_server = server
        self.say(f"tftp: listening on {cfg.listen_address}:{cfg.listen_port} (root {root})")

    async def start_dhcp(self) -> None:
        from pvsfarm.bootstrap.dhcp.server import start_dhcp_server
        from pvsfarm.bootstrap.dhcp.session import DhcpSettings

        c = self.cfg.dhcp
        assert c.interface and c.server_ip and c.subnet  # parse_config enforces these
        settings = DhcpSettings(
            interface=c.interface, server_ip=IPv4Address(c.server_ip), subnet=IPv4Network(c.subnet),
            routers=(IPv4Address(c.router),) if c.router else (),
            dns_servers=tuple(IPv4Address(d) for d in c.dns_servers), lease_s=c.lease_s,
            bios_loader=c.bios_loader, efi_loader=c.efi_loader, ipxe_script_url="boot.ipxe",
            proxy_mode=c.proxy_mode)
        handle = await start_dhcp_server(settings, self.inventory, gate=self.dhcp_gate)
        self.closers.append(handle.close)
        self.dhcp_handle = handle
        self.say(f"dhcp: serving {c.subnet} on {c.interface}{' (proxy)' if c.proxy_mode else ''}")

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        self.say(f"pvsfarm node {cfg.name!r}: database {self.app.db_url.split('@')[-1]}")
        self.say(f"data directory: {cfg.data_path} (store {cfg.store_path})")
        for path in (cfg.store_path, cfg.tftp_root):
            path.mkdir(parents=True, exist_ok=True)
        await self.start_inventory()
        self.start_listener()
        try:
            await self._start_servers()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stopping.set)
            # What start-up loaded (modules, ORM mappers, the inventory) lives as long as the node:
            # move it out of the cyclic GC's reach. Full collections walking it stopped the loop
            # for 150-320 ms at random (chaos farm, 2 cores): failover logins stalled behind them.
            gc.collect()
            gc.freeze()
            self.say("node ready")
            await asyncio.gather(self.sync_loop(), replicator_for(self).run())
        finally:
            await self.shutdown()

    async def _start_servers(self) -> None:
        cfg = self.cfg
        if cfg.http.enabled:
            await self.start_http()
        if cfg.nbd.enabled:
            await self.start_nbd()
        if cfg.tftp.enabled:
            await self.start_tftp()
        self.start_health()
        if cfg.dhcp.interface is None:
            self.say("dhcp: off (no dhcp.interface in the config)")
        else:
            await self.start_dhcp()

    async def shutdown(self) -> None:
        for close in reversed(self.closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result
        try:
            await asyncio.to_thread(self.sync, ServerState.DOWN)
        except PvsfarmError as exc:
            log.warning("could not mark the node down: %s", exc)
            pending = self.journal.take()
            await asyncio.to_thread(self.offline_cache.save_journal, pending)
            self.say(f"database unavailable at shutdown: {pending.pending()} session events kept in the offline cache")
        self.say("node stopped")


def run_node(app: App) -> None:
    """Run a node until SIGINT/SIGTERM, on uvloop where installed."""
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    node = Node(app, say=lambda line: print(line, flush=True))
    # The background sync thread (journal flush, inventory refresh) holds the GIL
    # in bursts; a shorter switch interval bounds how long the event loop waits.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if uvloop is not None:
        uvloop.run(node.run())
    else:
        asyncio.run(node.run())
