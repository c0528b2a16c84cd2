"""The asyncio server against real clients (curl, atftp) and a raw UDP peer, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pvsfarm.bootstrap.tftp.server import TftpServer, TftpSettings, start_tftp_server
from pvsfarm.bootstrap.tftp.wire import (
    Ack,
    Data,
    Error,
    ErrorCode,
    Message,
    OptionAck,
    ReadRequest,
    WriteRequest,
    parse,
    serialize,
)

BOOT_IPXE = b"#!ipxe\necho pvsfarm bootstrap\nchain http://10.0.0.1/login?mac=${net0/mac}\n"
Address = tuple[str, int]


def dynamic(name: str, client: Address) -> bytes | None:
    if name == "boot.ipxe":
        return BOOT_IPXE
    if name == "explode":
        raise RuntimeError("hook failure")
    return None


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "f1m.bin").write_bytes(os.urandom(1 << 20))
    (tmp_path / "small.txt").write_bytes(b"hello tftp\n")
    (tmp_path / "escape").symlink_to("/etc/passwd")
    return tmp_path


async def make_server(root: Path, **kw: object) -> TftpServer:
    settings = TftpSettings(root=root, host="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]
    return await start_tftp_server(settings, dynamic=dynamic)


@pytest.fixture
async def server(root: Path) -> AsyncIterator[TftpServer]:
    srv = await make_server(root, timeout_s=0.2, max_retries=3)
    yield srv
    srv.close()


class Peer(asyncio.DatagramProtocol):
    """A raw TFTP client socket."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.queue.put_nowait((data, addr))

    def send(self, msg: Message | bytes, port: int) -> None:
        self.transport.sendto(msg if isinstance(msg, bytes) else serialize(msg), ("127.0.0.1", port))

    async def recv(self, timeout: float = 2.0) -> tuple[Message, int]:
        data, addr = await asyncio.wait_for(self.queue.get(), timeout)
        return parse(data), addr[1]

    async def silent(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.queue.get(), seconds)
        except TimeoutError:
            return True
        return False


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    _, proto = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    yield proto
    proto.transport.close()


async def run(*cmd: str, cwd: Path | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 30)


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
needs_atftp = pytest.mark.skipif(shutil.which("atftp") is None, reason="atftp not installed (tools/apt-packages.txt)")
FILES = [("f1m.bin", None), ("small.txt", None), ("boot.ipxe", BOOT_IPXE)]


@needs_curl
@pytest.mark.parametrize(("name", "content"), FILES)
async def test_curl_fetches_identical(
    server: TftpServer, root: Path, tmp_path: Path, name: str, content: bytes | None
) -> None:
    out = tmp_path / "out"
    url = f"tftp://127.0.0.1:{server.port}/{name}"
    assert await run("curl", "-s", "--tftp-blksize", "1468", "-o", str(out), url) == 0
    assert out.read_bytes() == (content if content is not None else (root / name).read_bytes())
    assert await run("curl", "-s", "-o", str(out), url) == 0  # no options: plain RFC 1350
    assert out.read_bytes() == (content if content is not None else (root / name).read_bytes())


@needs_atftp
@pytest.mark.parametrize(("name", "content"), FILES)
async def test_atftp_windowsize_fetches_identical(
    server: TftpServer, root: Path, tmp_path: Path, name: str, content: bytes | None
) -> None:
    out = tmp_path / "out"
    opts = ["--option", "blksize 1468", "--option", "windowsize 8"]
    rc = await run("atftp", *opts, "-g", "-r", name, "-l", str(out), "127.0.0.1", str(server.port))
    assert rc == 0
    assert out.read_bytes() == (content if content is not None else (root / name).read_bytes())


@needs_atftp
async def test_windows_go_out_as_gso_sends(server: TftpServer, root: Path, tmp_path: Path) -> None:
    """A window of 8 is one send that the kernel cuts into 8 datagrams (UDP GSO)."""
    out = tmp_path / "out"
    opts = ["--option", "blksize 1468", "--option", "windowsize 8"]
    assert await run("atftp", *opts, "-g", "-r", "f1m.bin", "-l", str(out), "127.0.0.1", str(server.port)) == 0
    assert out.read_bytes() == (root / "f1m.bin").read_bytes()
    windows = (1 << 20) // (8 * 1468) + 1
    assert windows - 1 <= server.gso_sends <= windows + 3  # one per window but the first (+ resends)


@needs_atftp
async def test_gso_refused_by_the_kernel_falls_back_to_a_send_per_block(
    server: TftpServer, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket without UDP checksums cannot segment (the kernel answers EINVAL,
    as it answers EIO for a device without checksum offload): the transfer
    logs it once, sends block by block, and the file arrives whole."""
    from pvsfarm.bootstrap.tftp import transfer

    start = transfer.Transfer.start

    def start_without_checksums(self: transfer.Transfer) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_NO_CHECK", 11), 1)
        start(self)

    monkeypatch.setattr(transfer.Transfer, "start", start_without_checksums)
    caplog.set_level(logging.INFO, logger="pvsfarm.bootstrap.tftp.server")
    out = tmp_path / "out"
    opts = ["--option", "blksize 1468", "--option", "windowsize 8"]
    assert await run("atftp", *opts, "-g", "-r", "f1m.bin", "-l", str(out), "127.0.0.1", str(server.port)) == 0
    assert out.read_bytes() == (root / "f1m.bin").read_bytes()
    assert server.gso_sends == 0
    assert len([r for r in caplog.records if "UDP GSO refused" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("request_", "codes"),
    [
        (ReadRequest("../../etc/passwd"), {ErrorCode.ACCESS_VIOLATION}),
        (ReadRequest("/etc/passwd"), {ErrorCode.FILE_NOT_FOUND, ErrorCode.ACCESS_VIOLATION}),
        (ReadRequest("escape"), {ErrorCode.ACCESS_VIOLATION}),
        (ReadRequest("missing"), {ErrorCode.FILE_NOT_FOUND}),
        (ReadRequest("explode"), {ErrorCode.NOT_DEFINED}),
        (WriteRequest("small.txt"), {ErrorCode.ACCESS_VIOLATION}),
    ],
)
async def test_refused_requests(server: TftpServer, peer: Peer, request_: Message, codes: set[int]) -> None:
    peer.send(request_, server.port)
    msg, _ = await peer.recv()
    assert isinstance(msg, Error) and msg.code in codes
    assert await peer.silent(0.1)
    assert server.active_transfers == 0


async def test_blksize_out_of_range(server: TftpServer, peer: Peer) -> None:
    peer.send(ReadRequest("f1m.bin", options=(("blksize", "7"),)), server.port)
    msg, _ = await peer.recv()
    assert isinstance(msg, Data) and msg.block == 1 and len(msg.payload) == 512  # option declined
    peer.send(Error(0, "bye"), _port_of(server, peer))
    peer.send(ReadRequest("f1m.bin", options=(("blksize", "70000"),)), server.port)
    msg, port = await _first_non_data(peer)
    assert msg == OptionAck((("blksize", "65464"),))
    peer.send(Ack(0), port)
    msg, _ = await peer.recv()
    assert isinstance(msg, Data) and len(msg.payload) == 65464


async def _first_non_data(peer: Peer) -> tuple[Message, int]:
    while True:
        msg, port = await peer.recv()
        if not isinstance(msg, Data):
            return msg, port


def _port_of(server: TftpServer, peer: Peer) -> int:
    transfer = server._transfers[peer.transport.get_extra_info("sockname")]
    return int(transfer.sock.getsockname()[1])


async def test_ack_never_sent_ignored_then_transfer_goes_on(server: TftpServer, peer: Peer) -> None:
    peer.send(ReadRequest("f1m.bin"), server.port)
    msg, port = await peer.recv()
    assert msg == Data(1, msg.payload) and port != server.port  # own TID per transfer
    peer.send(Ack(7), port)
    msg, _ = await peer.recv()  # nothing but the retransmission of block 1 after timeout_s
    assert isinstance(msg, Data) and msg.block == 1
    peer.send(Ack(1), port)
    msg, _ = await peer.recv()
    assert isinstance(msg, Data) and msg.block == 2


async def test_silent_client_is_given_up_and_slot_freed(server: TftpServer, peer: Peer) -> None:
    peer.send(ReadRequest("f1m.bin", options=(("blksize", "1468"),)), server.port)
    msg, port = await peer.recv()
    assert isinstance(msg, OptionAck)
    peer.send(Ack(0), port)
    peer.send(ReadRequest("f1m.bin"), server.port)  # a retransmitted RRQ starts nothing new
    sent = []
    for _ in range(4):  # block 1 then 3 retransmissions
        msg, _ = await peer.recv()
        sent.append(msg.block)  # type: ignore[union-attr]
    assert sent == [1, 1, 1, 1]
    assert await peer.silent(0.5)
    assert server.active_transfers == 0


async def test_busy_beyond_max_transfers(root: Path, peer: Peer) -> None:
    srv = await make_server(root, max_transfers=1, timeout_s=0.2, max_retries=1)
    try:
        peer.send(ReadRequest("f1m.bin"), srv.port)
        await peer.recv()
        _, other = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
        other.send(ReadRequest("small.txt"), srv.port)
        msg, _ = await other.recv()
        assert isinstance(msg, Error) and "busy" in msg.message
        other.transport.close()
    finally:
        srv.close()


@needs_curl
async def test_garbage_then_still_serves(server: TftpServer, peer: Peer, root: Path, tmp_path: Path) -> None:
    junks = (b"", b"\x00", b"\xff" * 100, b"\x00\x01nonul", b"\x00\x03\x00\x01data", b"\x00\x04\x00\x01")
    junks += (os.urandom(600),)
    for junk in junks:
        peer.send(junk, server.port)
    peer.send(ReadRequest("small.txt"), server.port)
    msg, port = await peer.recv()
    for junk in (b"\xff", b"\x00\x06x\x00", os.urandom(50)):
        peer.send(junk, port)  # garbage into the transfer's TID
    peer.send(Ack(1), port)
    assert await peer.silent(0.3)
    out = tmp_path / "out"
    url = f"tftp://127.0.0.1:{server.port}/f1m.bin"
    assert await run("curl", "-s", "--tftp-blksize", "1468", "-o", str(out), url) == 0
    assert out.read_bytes() == (root / "f1m.bin").read_bytes()
    assert server.active_transfers == 0


@needs_curl
async def test_concurrent_clients(server: TftpServer, root: Path, tmp_path: Path) -> None:
    url = f"tftp://127.0.0.1:{server.port}/f1m.bin"
    fetches = (run("curl", "-s", "-o", str(tmp_path / f"o{i}"), "--tftp-blksize", "1468", url) for i in range(20))
    rcs = await asyncio.gather(*fetches)
    assert rcs == [0] * 20
    expected = (root / "f1m.bin").read_bytes()
    assert all((tmp_path / f"o{i}").read_bytes() == expected for i in range(20))


async def test_reuse_port_lets_two_servers_share_a_port(root: Path, peer: Peer) -> None:
    first = await make_server(root, reuse_port=True)
    second = await start_tftp_server(TftpSettings(root=root, host="127.0.0.1", port=first.port, reuse_port=True))
    try:
        assert second.port == first.port
        peer.send(ReadRequest("small.txt"), first.port)
        msg, port = await peer.recv()
        assert msg == Data(1, b"hello tftp\n")
        peer.send(Ack(1), port)
    finally:
        first.close()
        second.close()


async def test_reply_leaves_from_the_address_the_client_used(root: Path, peer: Peer) -> None:
    """Listening on the wildcard, a request to 127.0.0.2 is answered from 127.0.0.2
    (IP_PKTINFO), as clients sending to a VIP or a secondary address expect."""
    srv = await start_tftp_server(TftpSettings(root=root, host="0.0.0.0", port=0))
    try:
        peer.transport.sendto(serialize(ReadRequest("small.txt")), ("127.0.0.2", srv.port))
        data, addr = await asyncio.wait_for(peer.queue.get(), 2)
        assert parse(data) == Data(1, b"hello tftp\n") and addr[0] == "127.0.0.2"
        peer.transport.sendto(serialize(Ack(1)), addr)
    finally:
        srv.close()


async def test_fuzzed_requests_never_raise(server: TftpServer) -> None:
    """Random datagrams and requests with random names, straight into the request
    handler: nothing escapes, and every started transfer is accounted for."""
    import random

    rng = random.Random(1350)
    names = ["", "/", "..", "a/../../b", "\\..\\x", "small.txt", "boot.ipxe", "dir/" * 300, "\u00e9\u4e2d", "f1m.bin"]
    for i in range(400):
        peer: Address = ("127.0.0.1", 40000 + i)
        if i % 2:
            data = rng.randbytes(rng.randrange(0, 64))
        else:
            keys, values = ["blksize", "tsize", "timeout", "windowsize", "x"], ["0", "7", "512", "99999", "abc", ""]
            opts = tuple((rng.choice(keys), rng.choice(values)) for _ in range(rng.randrange(3)))
            data = serialize(ReadRequest(rng.choice(names), options=opts))
        server.on_request(data, peer)
    assert server.active_transfers <= 400
    server.close()
    assert server.active_transfers == 0


@pytest.mark.parametrize("client", ["curl", "atftp"])
async def test_block_number_rollover_with_real_clients(server: TftpServer, tmp_path: Path, client: str) -> None:
    """70,000 blocks of 8 octets: the block number wraps 65535 → 0 mid-transfer."""
    if shutil.which(client) is None:
        pytest.skip(f"{client} not installed")
    content = os.urandom(70_000 * 8 + 3)
    (server.settings.root / "wrap.bin").write_bytes(content)
    out = tmp_path / "out"
    if client == "curl":
        rc = await run("curl", "-s", "--tftp-blksize", "8", "-o", str(out), f"tftp://127.0.0.1:{server.port}/wrap.bin")
    else:
        opts = ["--option", "blksize 8", "--option", "windowsize 32"]
        rc = await run("atftp", *opts, "-g", "-r", "wrap.bin", "-l", str(out), "127.0.0.1", str(server.port))
    assert rc == 0 and out.read_bytes() == content


# A lock-step client in its own process (so it answers while the server busy-polls the
# event loop's thread): waits ``delay`` before each ACK, sends junk and a duplicate ACK
# mid-transfer, skips the ACK of block ``drop`` once (the server must resend that block).
SLOW_CLIENT = r"""
import socket, struct, sys, time
port, name, delay, drop, out = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(b"\x00\x01" + name.encode() + b"\x00octet\x00", ("127.0.0.1", port))
got, expect, seen, dropped = bytearray(), 1, [], False
while True:
    data, tid = s.recvfrom(65536)
    op, block = struct.unpack(">HH", data[:4])
    assert op == 3, data
    seen.append(block)
    if block == expect:
        got += data[4:]
        expect += 1
    if block == drop and not dropped:
        dropped = True
        continue
    time.sleep(delay)
    if block == 3:
        s.sendto(b"\xff\xff junk", tid)
        s.sendto(struct.pack(">HH", 4, 1), tid)  # a late duplicate ACK
    s.sendto(struct.pack(">HH", 4, block), tid)
    if len(data) < 516:
        break
open(out, "wb").write(got)
print(seen.count(drop))
"""


async def slow_client(port: int, name: str, out: Path, delay: float = 0.002, drop: int = 0) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLOW_CLIENT, str(port), name, str(delay), str(drop), str(out),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return int(stdout), out.read_bytes()


async def test_busy_polling_serves_a_slow_client_with_junk_and_a_lost_ack(root: Path, tmp_path: Path) -> None:
    """The client answers only after 2 ms: the server's immediate recv misses and,
    after a few misses, it busy-polls (a long window here, so every ACK is caught
    by the poll).  Junk, a duplicate ACK and a lost ACK on that path: the content is
    exact, the block whose ACK was lost went out twice (timer), the slot is freed."""
    (root / "f40k.bin").write_bytes(os.urandom(40 * 512 + 100))
    srv = await make_server(root, busy_poll_us=300_000, timeout_s=0.5)
    try:
        sent_twice, content = await slow_client(srv.port, "f40k.bin", tmp_path / "out", drop=30)
        assert content == (root / "f40k.bin").read_bytes()
        assert sent_twice == 2
        assert srv.busy_poll_hits > 0
        assert srv.active_transfers == 0
    finally:
        srv.close()


async def test_no_busy_polling_beyond_busy_poll_transfers(root: Path, tmp_path: Path) -> None:
    (root / "f10k.bin").write_bytes(os.urandom(20 * 512 + 1))
    srv = await make_server(root, busy_poll_us=300_000, busy_poll_transfers=0)
    try:
        _, content = await slow_client(srv.port, "f10k.bin", tmp_path / "out")
        assert content == (root / "f10k.bin").read_bytes()
        assert srv.busy_poll_hits == 0
    finally:
        srv.close()


@needs_curl
async def test_curl_with_busy_polling_disabled(root: Path, tmp_path: Path) -> None:
    srv = await make_server(root, busy_poll_us=0)
    try:
        out = tmp_path / "out"
        url = f"tftp://127.0.0.1:{srv.port}/f1m.bin"
        assert await run("curl", "-s", "--tftp-blksize", "1468", "-o", str(out), url) == 0
        assert out.read_bytes() == (root / "f1m.bin").read_bytes()
        assert srv.busy_poll_hits == 0
    finally:
        srv.close()


@needs_curl
async def test_transfers_share_a_file_version_and_never_serve_an_old_one(
    server: TftpServer, root: Path, tmp_path: Path
) -> None:
    """The second fetch of a file comes from the run cache; a file rewritten
    in place (same size) or replaced by a rename is served new, never stale."""
    out = tmp_path / "out"
    url = f"tftp://127.0.0.1:{server.port}/f1m.bin"

    async def fetch() -> bytes:
        assert await run("curl", "-s", "--tftp-blksize", "1468", "-o", str(out), url) == 0
        return out.read_bytes()

    assert server.run_cache is not None
    assert await fetch() == (root / "f1m.bin").read_bytes()
    misses = server.run_cache.misses
    assert await fetch() == (root / "f1m.bin").read_bytes()
    assert server.run_cache.misses == misses == server.run_cache.hits == 17  # 715 blocks, 44 per read-ahead
    new = os.urandom(1 << 20)
    with open(root / "f1m.bin", "r+b") as f:  # in place: same inode, same size
        f.write(new)
    assert await fetch() == new
    newer = os.urandom(1 << 20)
    (tmp_path / "staged").write_bytes(newer)
    os.replace(tmp_path / "staged", root / "f1m.bin")  # how loaders are updated: a new inode
    assert await fetch() == newer


async def test_a_long_client_error_ends_the_transfer_at_once(server: TftpServer, peer: Peer) -> None:
    """An ERROR longer than the server's read size is cut, and still honoured:
    the slot is freed now, not after the retransmission timeouts."""
    peer.send(ReadRequest("f1m.bin"), server.port)
    msg, port = await peer.recv()
    assert isinstance(msg, Data) and server.active_transfers == 1
    peer.send(serialize(Error(ErrorCode.DISK_FULL, "no space left on the target " * 40)), port)
    for _ in range(50):
        if server.active_transfers == 0:
            break
        await asyncio.sleep(0.01)
    assert server.active_transfers == 0
    assert await peer.silent(0.5)  # nothing resent


async def test_close_during_a_transfer(server: TftpServer, peer: Peer) -> None:
    peer.send(ReadRequest("f1m.bin"), server.port)
    msg, port = await peer.recv()
    peer.send(Ack(1), port)
    msg, _ = await peer.recv()
    assert isinstance(msg, Data) and msg.block == 2
    server.close()
    assert server.active_transfers == 0
    peer.send(Ack(2), port)
    assert await peer.silent(0.5)  # no DATA 3, no retransmission of 2
