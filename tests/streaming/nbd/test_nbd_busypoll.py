"""Busy polling in NBD workers (nbd/busypoll.py and the protocol's ``_poll_next``).

The poller spins for a connection's next request only while nothing else of the worker
has input; these tests pin that rule down, and check that connections served through
the spin get the right bytes.  Clients are threads with blocking sockets: the spin
releases the interpreter lock in every ``readv``, ``epoll`` call and ``sched_yield``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import socket
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvsfarm.streaming.nbd import FileDevice, OpenedExport
from pvsfarm.streaming.nbd.busypoll import BusyPoller
from pvsfarm.streaming.nbd.config import NbdConfig
from pvsfarm.streaming.nbd.server import Handed, NbdServerProtocol
from pvsfarm.streaming.nbd.session import ExportInfo
from pvsfarm.streaming.nbd.wire import Cmd, Request, SimpleReply

from .nbd_helpers import IMAGE_BYTES, TIMEOUT_S

# --- the poller alone -----------------------------------------------------------------


@pytest.fixture
def pairs():
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


def test_next_input_returns_what_the_connection_has(pairs) -> None:
    mine, peer = pairs()
    poller = BusyPoller(spin_s=30.0)
    poller.add(mine.fileno())
    mine.setblocking(False)
    peer.send(b"xyz")
    assert poller.next_input(mine.fileno()) == b"xyz"
    assert (poller.hits, poller.misses) == (1, 0)
    peer.close()
    assert poller.next_input(mine.fileno()) == b""  # EOF: the caller hands it to the event loop


def test_next_input_catches_input_that_arrives_while_spinning(pairs) -> None:
    mine, peer = pairs()
    poller = BusyPoller(spin_s=30.0)
    poller.add(mine.fileno())
    mine.setblocking(False)
    timer = threading.Timer(0.02, peer.send, (b"x",))
    timer.start()
    try:
        assert poller.next_input(mine.fileno()) == b"x"
    finally:
        timer.cancel()
    assert poller.hits == 1


def test_another_connection_with_input_ends_the_spin_at_once(pairs) -> None:
    mine, _peer = pairs()
    other, other_peer = pairs()
    poller = BusyPoller(spin_s=30.0)
    poller.add(mine.fileno())
    poller.add(other.fileno())
    mine.setblocking(False)
    other_peer.send(b"y")
    assert poller.next_input(mine.fileno()) is None
    assert (poller.hits, poller.misses) == (0, 0)  # not a time-out: it gave way
    assert other.recv(1) == b"y"  # the other connection's input is left for the event loop


def test_next_input_gives_up_after_its_time(pairs) -> None:
    mine, _peer = pairs()
    poller = BusyPoller(spin_s=0.001)
    poller.add(mine.fileno())
    mine.setblocking(False)
    assert poller.next_input(mine.fileno()) is None
    assert (poller.hits, poller.misses) == (0, 1)


def test_a_removed_or_closed_descriptor_does_not_break_the_set(pairs) -> None:
    mine, peer = pairs()
    gone, _ = pairs()
    poller = BusyPoller(spin_s=30.0)
    poller.add(mine.fileno())
    poller.add(gone.fileno())
    poller.remove(gone.fileno())
    poller.remove(gone.fileno())  # twice: no error
    gone.close()
    poller.remove(12345)  # never added
    mine.setblocking(False)
    peer.send(b"x")
    assert poller.next_input(mine.fileno()) == b"x"


# --- connections served through the spin -----------------------------------------------


@dataclass
class Spinning:
    port: int
    data: bytes
    poller: BusyPoller
    protocols: list[NbdServerProtocol]


@pytest.fixture
async def spinning(tmp_path: Path) -> AsyncIterator[Spinning]:
    """Connections start in transmission, as in a worker (``handed``), with a long spin."""
    data = os.urandom(IMAGE_BYTES)
    image = tmp_path / "base.img"
    image.write_bytes(data)
    poller = BusyPoller(spin_s=10.0)
    config = NbdConfig(busy_poll_us=10_000_000)
    loop = asyncio.get_running_loop()
    protocols: list[NbdServerProtocol] = []

    def factory() -> NbdServerProtocol:
        info = ExportInfo("base", IMAGE_BYTES, True, True)
        proto = NbdServerProtocol(None, config, handed=Handed(OpenedExport(FileDevice(image)), info), poller=poller)
        protocols.append(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    yield Spinning(server.sockets[0].getsockname()[1], data, poller, protocols)
    server.close()
    for proto in protocols:
        proto.abort()
    await asyncio.sleep(0)
    poller.close()


def read(sock: socket.socket, handle: int, offset: int, length: int) -> bytes:
    sock.sendall(Request(0, int(Cmd.READ), handle, offset, length).encode())
    head = recv_exact(sock, SimpleReply.SIZE)
    reply, _ = SimpleReply.decode(head)  # type: ignore[misc]
    assert (reply.error, reply.handle) == (0, handle)
    return recv_exact(sock, length)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


async def test_queue_depth_one_reads_are_served_through_the_spin(spinning: Spinning) -> None:
    rng = random.Random(7)
    offsets = [rng.randrange(0, IMAGE_BYTES - 4096) for _ in range(200)]

    def client() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", spinning.port), timeout=TIMEOUT_S) as s:
            out = [read(s, i, off, 4096) for i, off in enumerate(offsets)]
            s.sendall(Request(0, int(Cmd.DISC), 0, 0, 0).encode())
            return out

    got = await asyncio.wait_for(asyncio.to_thread(client), TIMEOUT_S * 3)
    want = [spinning.data[off : off + 4096] for off in offsets]
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(b"".join(want)).digest()
    assert spinning.poller.hits > 0  # the requests after the first came through the spin


async def test_a_spinning_connection_gives_way_to_another(spinning: Spinning) -> None:
    """A reads once and then stays silent, so the worker spins on A (up to 10 s);
    B's request must end that spin and be answered well before.  One thread drives
    both: the test's own coroutine cannot run while the loop spins."""

    a = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", spinning.port), TIMEOUT_S)
    b = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", spinning.port), TIMEOUT_S)
    try:
        for _ in range(500):  # both must be registered before A's spin starts
            if len(spinning.protocols) == 2:
                break
            await asyncio.sleep(0.01)
        b.settimeout(5.0)  # well below the 10 s spin: a spin that ignores B fails here

        def client() -> tuple[bytes, bytes]:
            first = read(a, 1, 0, 4096)
            second = read(b, 2, 8192, 4096)
            a.close()
            b.close()  # EOF ends the spin on B
            return first, second

        first, second = await asyncio.wait_for(asyncio.to_thread(client), TIMEOUT_S * 3)
    finally:
        a.close()
        b.close()
    assert first == spinning.data[:4096]
    assert second == spinning.data[8192 : 8192 + 4096]
    assert spinning.poller.misses == 0


async def test_a_client_that_closes_during_the_spin_is_released(spinning: Spinning, tmp_path: Path) -> None:
    closed = asyncio.Event()

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", spinning.port), timeout=TIMEOUT_S) as s:
            return read(s, 9, 4096, 4096)

    got = await asyncio.wait_for(asyncio.to_thread(client), TIMEOUT_S)
    assert got == spinning.data[4096:8192]
    proto = spinning.protocols[-1]
    for _ in range(200):
        if proto._closing:  # connection_lost ran: EOF seen through the event loop
            closed.set()
            break
        await asyncio.sleep(0.01)
    assert closed.is_set()
    assert proto._poll_fd == -1  # its dup was removed from the set and closed


async def test_a_client_that_resets_during_the_spin_is_released(spinning: Spinning, caplog) -> None:
    """A reset (RST) seen by the spin's own read ends the spin; the event loop then
    closes the connection, and the worker goes on serving others."""

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", spinning.port), timeout=TIMEOUT_S) as s:
            got = read(s, 3, 0, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return got  # closing with linger 0 sends RST while the server spins on it

    assert await asyncio.wait_for(asyncio.to_thread(client), TIMEOUT_S) == spinning.data[:4096]
    proto = spinning.protocols[-1]
    for _ in range(200):
        if proto._closing:
            break
        await asyncio.sleep(0.01)
    assert proto._closing and proto._poll_fd == -1

    def second() -> bytes:
        with socket.create_connection(("127.0.0.1", spinning.port), timeout=TIMEOUT_S) as s:
            return read(s, 4, 8192, 4096)

    assert await asyncio.wait_for(asyncio.to_thread(second), TIMEOUT_S) == spinning.data[8192:12288]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a peer's reset is no internal error


def test_spins_that_time_out_back_off_and_a_hit_resets(pairs) -> None:
    mine, peer = pairs()
    poller = BusyPoller(spin_s=0.0005)
    poller.add(mine.fileno())
    mine.setblocking(False)
    assert poller.next_input(mine.fileno()) is None  # timed out: skip the next wait
    assert (poller.misses, poller.skipped) == (1, 0)
    peer.send(b"x")
    assert poller.next_input(mine.fileno()) is None  # skipped, although input is there
    assert (poller.hits, poller.skipped) == (0, 1)
    assert poller.next_input(mine.fileno()) == b"x"  # spins again
    # a hit resets: the next time-out skips one wait again, then two, then four

    def skips_until_the_next_spin() -> int:
        n = 0
        while True:
            skipped, misses = poller.skipped, poller.misses
            assert poller.next_input(mine.fileno()) is None  # no input now
            if poller.skipped > skipped:
                n += 1
                continue
            assert poller.misses == misses + 1  # it spun, and timed out
            return n

    assert poller.next_input(mine.fileno()) is None
    skips = [skips_until_the_next_spin() for _ in range(3)]
    assert skips == [1, 2, 4]


def test_back_off_is_per_connection(pairs) -> None:
    quiet, _ = pairs()
    busy, busy_peer = pairs()
    poller = BusyPoller(spin_s=0.0005)
    poller.add(quiet.fileno())
    poller.add(busy.fileno())
    quiet.setblocking(False)
    busy.setblocking(False)
    assert poller.next_input(quiet.fileno()) is None  # quiet backs off
    busy_peer.send(b"x")
    assert poller.next_input(busy.fileno()) == b"x"  # busy does not
    assert poller.skipped == 0
