"""Health-gated DHCP (mixed into `Node`).

The seed article's weak spot of co-hosting TFTP with DHCP: a node whose TFTP
crashed keeps answering DHCP and names itself as the TFTP server, so every
target it answers fails to boot. Here the node checks its own listeners
every second (`probes.HealthMonitor`, debounced by `health.HealthTracker`)
and, while any of them is down, its DHCP server drops every request, so the
healthy peers answer them all. The verdict goes to ``servers.health`` on each
heartbeat and into ``/health``; HTTP status stays 200 while degraded, so peers
probing ``/health`` (and our own HTTP probe) still see the HTTP service alive.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pvsfarm.addr import is_loopback
from pvsfarm.faults import FaultSwitch
from pvsfarm.health import HealthState, dhcp_switch
from pvsfarm.probes import HealthMonitor, node_probes, quiet_tftp_logs

if TYPE_CHECKING:
    from pvsfarm.bootstrap.dhcp.server import DhcpServerHandle
    from pvsfarm.bootstrap.tftp.server import TftpServer
    from pvsfarm.node import Node
    from pvsfarm.streaming.nbd.handoff import WorkerPool

log = logging.getLogger("pvsfarm.node")
_NO_MONITOR = HealthState()


class HealthMixin:
    health_monitor: HealthMonitor | None = None
    tftp_server: TftpServer | None = None
    dhcp_handle: DhcpServerHandle | None = None
    nbd_pool: WorkerPool | None = None

    @property
    def health(self) -> HealthState:
        """The debounced verdict (healthy until the monitor says otherwise)."""
        return self.health_monitor.state if self.health_monitor is not None else _NO_MONITOR

    def dhcp_gate(self) -> bool:
        """The DHCP server answers only while this is True."""
        return self.health.healthy

    def health_fields(self) -> dict[str, Any]:
        """What ``/health`` adds about the self-check."""
        state = self.health
        fields: dict[str, Any] = {"status": "ok" if state.healthy else "degraded", "health": state.summary(),
                                  "failing": list(state.failing)}
        if self.dhcp_handle is not None:
            stats = self.dhcp_handle.stats
            fields["dhcp"] = {"answering": state.healthy, "received": stats.received, "replied": stats.replied,
                              "gated": stats.gated}
        pool = self.nbd_pool
        if pool is not None:
            fields["nbd"] = {"workers": len(pool.pids()), "connections": pool.connections(),
                             "busy_poll": pool.busy_poll_stats()}
        return fields

    def start_health(self: Node) -> None:  # type: ignore[misc]
        """Start the self-check once the listeners are up."""
        quiet = quiet_tftp_logs()
        self.health_monitor = HealthMonitor(node_probes(self.cfg, quiet), on_change=self._health_changed)
        self.closers.append(self.health_monitor.start())
        self.closers.append(lambda: logging.getLogger("pvsfarm.bootstrap.tftp.server").removeFilter(quiet))

    def _health_changed(self: Node, old: HealthState, new: HealthState) -> None:  # type: ignore[misc]
        log.warning("health: %s", new.summary() if not new.healthy else "ok again")
        switch = dhcp_switch(old, new)
        if switch is not None and self.cfg.dhcp.interface is not None:
            log.warning("%s", switch)

    def add_admin_routes(self: Node, webapp: web.Application) -> None:  # type: ignore[misc]
        FaultSwitch(self.cfg.admin_faults, {"tftp": self._tftp_fault}).routes(webapp)

    async def add_admin_site(self: Node, runner: web.AppRunner) -> None:  # type: ignore[misc]
        """When fault injection is on and HTTP listens on one non-loopback
        address, also listen on 127.0.0.1 (same port) so the loopback-only
        endpoint is reachable at all."""
        cfg = self.cfg.http
        if self.cfg.admin_faults and cfg.listen_address not in ("", "0.0.0.0", "::") \
                and not is_loopback(cfg.listen_address):
            await web.TCPSite(runner, "127.0.0.1", cfg.listen_port).start()

    def _tftp_fault(self, down: bool) -> None:
        if self.tftp_server is not None:
            self.tftp_server.dropping = down
