"""Connections handed to worker processes after the handshake (nbd/handoff.py, worker.py).

A real WorkerPool with two workers behind the asyncio server; the export is a write
cache shared by the session's connections, as the node's Exports builds it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from pvsfarm.store import SharedDevice, WriteCache
from pvsfarm.streaming.nbd import FileDevice, OpenedExport, start_nbd_server
from pvsfarm.streaming.nbd.handoff import WorkerPool
from pvsfarm.streaming.nbd import wire
from pvsfarm.streaming.nbd.wire import Cmd, Errno, Opt, Rep

from .nbd_helpers import IMAGE_BYTES, TIMEOUT_S, RawClient, Tracker, needs_tools, run, sha256


class CacheResolver:
    """``cache``: one write cache per "session" (shared while a connection holds it);
    ``plain``: a FileDevice; drop functions are collected as Exports.bind_disconnect does."""

    def __init__(self, base: Path, cache: Path) -> None:
        self.base, self.cache = base, cache
        self.shared: SharedDevice | None = None
        self.tracker = Tracker()
        self.drops: list[Callable[[], None]] = []

    def open_export(self, name: str, peer: tuple[str, int]) -> OpenedExport | None:
        t = self.tracker
        if name == "plain":
            return OpenedExport(FileDevice(self.base), "", t.on_io, t.on_close, self.drops.append)
        if name != "cache":
            return None
        if self.shared is None or self.shared.device is None:
            self.shared = SharedDevice(WriteCache.create(self.base, self.cache))
        return OpenedExport(self.shared.handle(), "", t.on_io, t.on_close, self.drops.append)

    def list_exports(self, peer: tuple[str, int]) -> list[str]:
        return []


@dataclass
class Served:
    port: int
    data: bytes
    base: Path
    resolver: CacheResolver
    pool: WorkerPool
    clients: list[RawClient] = field(default_factory=list)

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    async def open(self, name: str = "cache") -> RawClient:
        client = await RawClient.open(self.port, name)
        self.clients.append(client)
        return client


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    data = os.urandom(IMAGE_BYTES)
    base = tmp_path / "base.img"
    base.write_bytes(data)
    resolver = CacheResolver(base, tmp_path / "s.cow")
    pool = WorkerPool(2)
    pool.start()
    assert await pool.wait_ready()
    server = await start_nbd_server(resolver, "127.0.0.1", 0, pool=pool)
    s = Served(server.sockets[0].getsockname()[1], data, base, resolver, pool)
    yield s
    for c in s.clients:
        c.close()
    server.close()
    await server.wait_closed()
    pool.close()


def holder(client: RawClient) -> int | None:
    """The pid whose socket is the server end of ``client``'s connection."""
    port = client.writer.get_extra_info("sockname")[1]
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if int(cols[2].split(":")[1], 16) == port:  # remote end is the client
                inodes.add(cols[9])
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if any(f"socket:[{i}]" in links for i in inodes):
            return int(pid)
    return None


async def eventually(check: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_connections_are_served_by_the_workers(served: Served) -> None:
    a, b = await served.open(), await served.open()
    await eventually(lambda: {holder(a), holder(b)} == set(served.pool.pids()))
    assert os.getpid() not in {holder(a), holder(b)}
    err, data = await a.command(Cmd.READ, 4096, 8192)
    assert err == 0 and data == served.data[4096 : 4096 + 8192]


async def test_a_worker_keeps_the_structured_replies_the_handshake_negotiated(served: Served) -> None:
    client = await RawClient.connect(served.port)
    served.clients.append(client)
    (ack,) = await client.option(Opt.STRUCTURED_REPLY)
    assert ack.reply_type == Rep.ACK
    assert (await client.option(Opt.GO, wire.InfoRequest("cache").encode()))[-1].reply_type == Rep.ACK
    plain = await served.open()  # and one that did not negotiate them
    await eventually(lambda: holder(client) in served.pool.pids() and holder(plain) in served.pool.pids())
    assert await client.command(Cmd.READ, 4096, 512) == (0, served.data[4096:4608]) and client.structured
    assert await client.command(Cmd.READ, IMAGE_BYTES, 512) == (Errno.EINVAL, b"") and client.structured
    assert await plain.command(Cmd.READ, 4096, 512) == (0, served.data[4096:4608]) and not plain.structured


@needs_tools
async def test_real_clients_read_identical_bytes(served: Served, tmp_path: Path) -> None:
    rc, out, _ = await run("nbdinfo", "--size", served.uri("cache"))
    assert rc == 0 and int(out) == IMAGE_BYTES
    copy = tmp_path / "copy.img"
    rc, _, err = await run("nbdcopy", "--connections=4", served.uri("cache"), str(copy))
    assert rc == 0, err
    assert sha256(copy.read_bytes()) == sha256(served.data)
    rc, _, err = await run("nbdcopy", served.uri("plain"), str(copy))  # a FileDevice is handed over too
    assert rc == 0 and sha256(copy.read_bytes()) == sha256(served.data), err
    # the workers report the bytes; the exports are released when they report the closes
    await eventually(lambda: served.resolver.tracker.read >= 2 * IMAGE_BYTES)
    await eventually(lambda: served.pool.connections() == 0)


@needs_tools
async def test_writes_in_one_worker_are_read_in_the_other(served: Served) -> None:
    a, b = await served.open(), await served.open()  # least-loaded: one per worker
    await eventually(lambda: holder(a) is not None and holder(b) is not None)
    assert holder(a) != holder(b)
    assert (await a.command(Cmd.WRITE, 4096, 1000, payload=b"\xab" * 1000))[0] == 0
    assert (await b.command(Cmd.WRITE, 4596, 100, payload=b"\xcd" * 100))[0] == 0  # same 64 KiB block
    want = b"\xab" * 500 + b"\xcd" * 100 + b"\xab" * 400
    assert (await b.command(Cmd.READ, 4096, 1000))[1] == want
    assert (await a.command(Cmd.READ, 4096, 1000))[1] == want
    # a real client's writes (a third connection) land in the same cache
    rc, out, err = await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 70000 140000", served.uri("cache"))
    assert rc == 0, err
    assert (await a.command(Cmd.READ, 70000, 140000))[1] == b"\x5a" * 140000
    assert served.resolver.shared is not None and served.resolver.shared.device is not None
    with open(served.base, "rb") as f:  # the base is never written
        assert sha256(f.read()) == sha256(served.data)
    await eventually(lambda: served.resolver.tracker.written >= 1100 + 140000)


async def test_drop_closes_connections_held_by_workers(served: Served) -> None:
    a, b = await served.open(), await served.open()
    await eventually(lambda: holder(a) in served.pool.pids() and holder(b) in served.pool.pids())
    assert served.pool.connections() == 2
    for drop in served.resolver.drops:  # what Exports.move_one_session does
        drop()
    assert await a.closed_by_server() and await b.closed_by_server()
    await eventually(lambda: served.resolver.tracker.closed == 2 and served.pool.connections() == 0)


async def test_workers_stop_serving_when_the_main_process_stops_pinging(served: Served) -> None:
    a = await served.open()
    await eventually(lambda: holder(a) in served.pool.pids())
    assert served.pool._pinger is not None
    served.pool._pinger.cancel()  # as if the main process hung (SIGSTOP)
    assert await a.closed_by_server()
    await eventually(lambda: served.resolver.tracker.closed == 1)


async def test_a_dead_worker_is_replaced_and_its_connections_released(served: Served) -> None:
    a = await served.open()
    await eventually(lambda: holder(a) in served.pool.pids())
    victim = holder(a)
    assert victim is not None
    for i in range(50):  # queue depth 1: the worker waits (busy-polls) after each reply
        assert (await a.command(Cmd.READ, i * 4096, 4096))[0] == 0
    await eventually(lambda: sum(served.pool.busy_poll_stats().values()) > 0)
    polled = served.pool.busy_poll_stats()
    os.kill(victim, signal.SIGKILL)
    assert await a.closed_by_server()
    await eventually(lambda: served.resolver.tracker.closed == 1)
    await eventually(lambda: len(served.pool.pids()) == 2 and victim not in served.pool.pids())
    b = await served.open()
    await eventually(lambda: holder(b) in served.pool.pids())
    err, data = await b.command(Cmd.READ, 0, 4096)
    assert err == 0 and data == served.data[:4096]
    after = served.pool.busy_poll_stats()  # the dead worker's counts are kept
    assert all(after[k] >= polled[k] for k in polled), (polled, after)
