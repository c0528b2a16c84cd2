"""A datagram endpoint with an awaitable receive (DHCP and TFTP clients)."""

from __future__ import annotations

import asyncio
import socket

MAX_QUEUED = 256
"""Datagrams kept while nobody is receiving; more are dropped, as a full socket buffer would."""


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(MAX_QUEUED)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.queue.full():
            self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a dead server: the receive times out and we retry

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def recv(self, timeout_s: float) -> tuple[bytes, tuple[str, int]]:
        """The next datagram; TimeoutError after ``timeout_s``."""
        return await asyncio.wait_for(self.queue.get(), max(timeout_s, 0.0))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_udp(sock: socket.socket) -> UdpEndpoint:
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    _transport, endpoint = await loop.create_datagram_endpoint(UdpEndpoint, sock=sock)
    return endpoint
