"""The asyncio adapter: one UDP socket on one interface, bytes in, bytes out.

Everything that decides lives in `session`; this file parses, asks, sends,
and keeps peer garbage (or a failing inventory) from ever stopping the loop.
There is no lease file: reservations are static and come from the inventory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import cast

from pvsfarm.bootstrap.dhcp.session import DhcpResponder, DhcpSettings, UnknownHook
from pvsfarm.bootstrap.dhcp.wire import PXE_PORT, SERVER_PORT, parse, serialize
from pvsfarm.errors import MalformedMessage
from pvsfarm.views import Inventory

_log = logging.getLogger(__name__)

#: Linux <linux/socket.h>; Python exposes them only on some builds.
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Receive buffer asked for (Linux doubles it; ~2,000 queued requests). The
#: 208 KiB default overflowed whenever the node was descheduled for ~50 ms
#: under a 4k DORA/s boot storm: every drop in benchmarks/dhcp_bench.py was
#: a UDP RcvbufErrors, and a dropped DISCOVER costs the target a 4 s retry.
RCVBUF_BYTES = 1 << 20


def open_dhcp_socket(interface: str, port: int = SERVER_PORT) -> socket.socket:
    """A UDP socket on ``0.0.0.0:port`` that hears and sends only on
    ``interface`` (SO_BINDTODEVICE, set before bind so several listeners on
    different interfaces can share port 67), with SO_BROADCAST for replies
    to 255.255.255.255. Call it inside the network namespace that owns
    ``interface``; the socket stays there afterwards."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        _grow_receive_buffer(sock)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@functools.lru_cache(maxsize=1024)
def _destination(address: IPv4Address, port: int) -> tuple[str, int]:
    """``str(IPv4Address)`` costs ~1 µs, paid once per reply before this
    cache (almost every reply goes to 255.255.255.255)."""
    return str(address), port


def _grow_receive_buffer(sock: socket.socket) -> None:
    """SO_RCVBUFFORCE passes net.core.rmem_max (212,992 on stock Debian) when
    we hold CAP_NET_ADMIN; otherwise SO_RCVBUF gets what rmem_max allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RCVBUF_BYTES)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)


class _RateLimitedLog:
    """At most ``burst`` warnings per ``window_s``, then one summary line:
    a flood of garbage must not become a flood of log lines."""

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._start, self._count, self._suppressed = 0.0, 0, 0

    def warning(self, now: float, msg: str, *args: object, exc: bool = False) -> None:
        if now - self._start >= self.window_s:
            if self._suppressed:
                _log.warning("dhcp: %d similar messages suppressed", self._suppressed)
            self._start, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            _log.warning(msg, *args, exc_info=exc)
        else:
            self._suppressed += 1


@dataclass(slots=True)
class DhcpStats:
    """Counters since start (exported by the node's status page)."""

    received: int = 0
    replied: int = 0
    malformed: int = 0
    errors: int = 0
    gated: int = 0
    """Dropped unanswered because the gate was closed (the node unhealthy)."""


class _DhcpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DhcpResponder, port: int, stats: DhcpStats,
                 limiter: _RateLimitedLog, gate: Callable[[], bool] | None = None) -> None:
        self._responder, self._port, self._gate = responder, port, gate
        self._stats, self._limiter = stats, limiter
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # 3.11's selector transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self._stats.received += 1
        if self._gate is not None and not self._gate():
            self._stats.gated += 1
            return
        try:
            request = parse(data)
        except MalformedMessage as exc:
            self._stats.malformed += 1
            self._limiter.warning(self._loop.time(), "dhcp: dropped malformed "
                                  "datagram from %s: %s", addr, exc)
            return
        try:
            source = None
            if self._port == PXE_PORT:
                source = (IPv4Address(str(addr[0])), int(addr[1]))
            reply = self._responder.respond(request, local_port=self._port, source=source)
            if reply is None or self._transport is None:
                return
            self._transport.sendto(serialize(reply.message), _destination(reply.address, reply.port))
            self._stats.replied += 1
        except Exception:  # the edge: a bad peer or a broken inventory must not kill us
            self._stats.errors += 1
            self._limiter.warning(self._loop.time(), "dhcp: error answering %s",
                                  addr, exc=True)

    def error_received(self, exc: Exception) -> None:
        self._stats.errors += 1
        self._limiter.warning(self._loop.time(), "dhcp: socket error: %s", exc)


@dataclass(slots=True)
class DhcpServerHandle:
    """A running listener. ``close()`` stops it (idempotent)."""

    settings: DhcpSettings
    stats: DhcpStats
    transports: list[asyncio.DatagramTransport] = field(default_factory=list)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        self.transports.clear()

    async def __aenter__(self) -> "DhcpServerHandle":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def start_dhcp_server(settings: DhcpSettings, inventory: Inventory, *,
                            on_unknown: UnknownHook | None = None,
                            sock: socket.socket | None = None,
                            pxe_sock: socket.socket | None = None,
                            gate: Callable[[], bool] | None = None) -> DhcpServerHandle:
    """Serve ``settings.interface`` until ``close()``.

    ``sock`` (port 67) and ``pxe_sock`` (port 4011, ProxyDHCP only) may be
    given already opened with `open_dhcp_socket`, e.g. inside another network
    namespace; otherwise they are opened here. ``on_unknown`` is called
    synchronously for each message from a MAC not in the inventory (firmware
    retries, so expect repeats): it must be quick and must not block.
    ``gate`` is asked before each datagram: while it returns False every
    request is dropped unanswered (a node whose TFTP is down must not name
    itself as the boot server; peers answer instead).
    """
    loop = asyncio.get_running_loop()
    responder = DhcpResponder(settings, inventory, on_unknown)
    handle = DhcpServerHandle(settings, DhcpStats())
    limiter = _RateLimitedLog()
    sockets = [(sock or open_dhcp_socket(settings.interface, SERVER_PORT), SERVER_PORT)]
    if settings.proxy_mode:
        sockets.append((pxe_sock or open_dhcp_socket(settings.interface, PXE_PORT), PXE_PORT))
    try:
        for s, port in sockets:
            transport, _ = await loop.create_datagram_endpoint(
                lambda port=port: _DhcpProtocol(responder, port, handle.stats, limiter, gate),
                sock=s)
            handle.transports.append(transport)
    except BaseException:
        handle.close()
        for s, _ in sockets:
            s.close()
        raise
    _log.info("dhcp: serving %s on %s (%s)", settings.subnet, settings.interface,
              "proxy" if settings.proxy_mode else "addresses")
    return handle
