"""ReplyWriter: raw sendfile that runs out of socket buffer waits for space and goes on
(with an event loop) or hands the rest, in order, to the transport (without); batching
flushes at the cap; read errors surface before any byte; a lone READ's reply goes
straight to the socket only when nothing else is waiting, and in order when the socket
is full."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvsfarm.streaming.nbd.backend import Extent
from pvsfarm.streaming.nbd.replies import ReplyAborted, ReplyWriter
from pvsfarm.streaming.nbd.wire import encode_simple_reply


class FakeTransport:
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock, self.written, self.calls = sock, bytearray(), 0

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None

    def get_write_buffer_size(self) -> int:
        return len(self.written)  # anything handed over counts as "still buffered"

    def writelines(self, parts) -> None:
        self.calls += 1
        for part in parts:
            self.written += part

    def write(self, data) -> None:
        self.calls += 1
        self.written += data


def drain(sock: socket.socket) -> bytes:
    out = bytearray()
    sock.setblocking(False)
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


@pytest.fixture
def image(tmp_path: Path) -> tuple[int, bytes]:
    data = os.urandom(4 * 2**20)
    path = tmp_path / "img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def test_partial_sendfile_continues_through_the_transport_in_order(image) -> None:
    fd, data = image
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    server.setblocking(False)
    transport = FakeTransport(server)
    writer = ReplyWriter(transport, flush_bytes=256 * 1024, sendfile_min_bytes=128 * 1024)
    extents = [Extent(fd, 0, 2**20), Extent(-1, 0, 4096), Extent(fd, 3 * 2**20, 2**20)]
    writer.read_reply(encode_simple_reply(0, 99), extents)
    on_socket = drain(client)
    assert 0 < len(on_socket) < 16 + 2**20 + 4096 + 2**20  # the socket filled up mid-reply
    assert transport.written  # ... and the transport got the rest
    expected = encode_simple_reply(0, 99) + data[: 2**20] + bytes(4096) + data[3 * 2**20 :]
    assert on_socket + bytes(transport.written) == expected
    writer.close()
    server.close()
    client.close()


def test_small_reads_are_batched_up_to_the_cap(image) -> None:
    fd, data = image
    transport = FakeTransport(None)
    writer = ReplyWriter(transport, flush_bytes=64 * 1024, sendfile_min_bytes=0)
    for handle in range(20):  # 20 x (16 + 4096) bytes: one flush at the cap, the rest at flush()
        writer.read_reply(encode_simple_reply(0, handle), [Extent(fd, handle * 4096, 4096)])
    assert transport.calls == 1
    writer.flush()
    assert transport.calls == 2
    expected = b"".join(encode_simple_reply(0, h) + data[h * 4096 : (h + 1) * 4096] for h in range(20))
    assert bytes(transport.written) == expected


def test_read_error_raises_before_anything_is_queued(image, tmp_path: Path) -> None:
    fd, _ = image
    transport = FakeTransport(None)
    writer = ReplyWriter(transport, flush_bytes=1 << 20, sendfile_min_bytes=0)
    with pytest.raises(OSError):
        writer.read_reply(encode_simple_reply(0, 1), [Extent(fd, 4 * 2**20 - 10, 4096)])  # short read past EOF
    writer.flush()
    assert transport.written == b""


def test_eof_during_sendfile_after_the_header_aborts(image) -> None:
    fd, _ = image
    server, client = socket.socketpair()
    server.setblocking(False)
    writer = ReplyWriter(FakeTransport(server), flush_bytes=1 << 20, sendfile_min_bytes=4096)
    with pytest.raises(ReplyAborted):
        writer.read_reply(encode_simple_reply(0, 1), [Extent(fd, 4 * 2**20 - 4096, 8192)])  # file ends mid-extent
    writer.close()
    server.close()
    client.close()


async def test_a_full_socket_makes_the_writer_busy_until_sendfile_is_done(image) -> None:
    fd, data = image
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    server.setblocking(False)
    idle, aborted = asyncio.Event(), []
    transport = FakeTransport(server)
    writer = ReplyWriter(transport, flush_bytes=256 * 1024, sendfile_min_bytes=128 * 1024,
                         loop=asyncio.get_running_loop(), on_idle=idle.set, on_abort=aborted.append)
    extents = [Extent(fd, 0, 2**20), Extent(-1, 0, 4096), Extent(fd, 3 * 2**20, 2**20)]
    expected = encode_simple_reply(0, 99) + data[: 2**20] + bytes(4096) + data[3 * 2**20 :]
    writer.read_reply(encode_simple_reply(0, 99), extents)
    assert writer.busy and not idle.is_set()  # the socket filled up mid-reply
    received = bytearray()
    for _ in range(10_000):
        received += drain(client)
        if len(received) >= len(expected) and idle.is_set():
            break
        await asyncio.sleep(0.001)
    assert bytes(received) == expected
    assert idle.is_set() and not writer.busy and not aborted
    assert transport.written == b""  # nothing was copied through the transport
    writer.close()
    server.close()
    client.close()


@contextlib.contextmanager
def direct_writer(send_buffer_bytes: int = 0) -> Iterator[tuple[ReplyWriter, FakeTransport, socket.socket, socket.socket]]:
    """A writer that may send straight to its socket (sendfile on: it keeps the raw
    fd), its transport, its socket and the peer's."""
    server, client = socket.socketpair()
    if send_buffer_bytes:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    server.setblocking(False)
    transport = FakeTransport(server)
    writer = ReplyWriter(transport, flush_bytes=256 * 1024, sendfile_min_bytes=128 * 1024)
    try:
        yield writer, transport, server, client
    finally:
        writer.close()
        server.close()
        client.close()


def test_a_lone_read_reply_goes_straight_to_the_socket(image) -> None:
    fd, data = image
    with direct_writer() as (writer, transport, _server, client):
        assert writer.lone_read_reply(encode_simple_reply(0, 7), [Extent(fd, 8192, 4096)])
        assert writer.lone_read_reply(encode_simple_reply(0, 8), [Extent(-1, 0, 512)])  # unallocated: zeros
        assert transport.calls == 0  # nothing through the transport
        assert drain(client) == encode_simple_reply(0, 7) + data[8192:12288] + encode_simple_reply(0, 8) + bytes(512)


def test_a_lone_read_reply_is_refused_unless_it_is_all_there_is_to_send(image) -> None:
    fd, _ = image
    header = encode_simple_reply(0, 1)
    with direct_writer() as (writer, transport, server, client):
        assert not writer.lone_read_reply(header, [Extent(fd, 0, 4096), Extent(fd, 8192, 4096)])  # two extents
        assert not writer.lone_read_reply(header, [Extent(fd, 0, 128 * 1024)])  # sendfile's size
        writer.add(b"batched")
        assert not writer.lone_read_reply(header, [Extent(fd, 0, 4096)])  # would overtake the batch
        writer.flush()
        assert not writer.lone_read_reply(header, [Extent(fd, 0, 4096)])  # would overtake the transport's buffer
        no_sendfile = ReplyWriter(FakeTransport(server), flush_bytes=256 * 1024, sendfile_min_bytes=0)
        assert not no_sendfile.lone_read_reply(header, [Extent(fd, 0, 4096)])  # no raw socket without sendfile
        assert drain(client) == b""
        assert bytes(transport.written) == b"batched"


def test_a_lone_read_reply_on_a_full_socket_goes_on_through_the_transport_in_order(image) -> None:
    fd, data = image
    with direct_writer(send_buffer_bytes=8192) as (writer, transport, server, client):
        filler = bytearray()
        while True:  # fill the socket up to a few bytes short of its limit
            try:
                filler += b"f" * server.send(b"f" * 1000)
            except BlockingIOError:
                break
        assert writer.lone_read_reply(encode_simple_reply(0, 3), [Extent(fd, 4096, 65536)])
        assert transport.written  # the socket could not take it all
        on_socket = drain(client)
        assert on_socket + bytes(transport.written) == bytes(filler) + encode_simple_reply(0, 3) + data[4096:69632]


def test_a_failed_lone_read_sends_nothing(image) -> None:
    fd, _ = image
    with direct_writer() as (writer, transport, _server, client):
        with pytest.raises(OSError):
            writer.lone_read_reply(encode_simple_reply(0, 1), [Extent(fd, 4 * 2**20 - 10, 4096)])  # short read past EOF
        assert drain(client) == b""
        assert transport.written == b""
