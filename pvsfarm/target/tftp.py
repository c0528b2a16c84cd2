"""The target's TFTP client: one read request, lock-step (RFC 1350 §2), as iPXE fetches a script.

RRQ with ``blksize`` (RFC 2348, 1468 = 1500-byte Ethernet MTU - IP/UDP/TFTP
headers, what iPXE and PXE ROMs ask for) and ``tsize`` (RFC 2349). The server
answers from a new port (its transfer ID); an OACK (RFC 2347) is acknowledged
with ACK 0; a plain DATA 1 means the server ignored the options (512-byte blocks).
Every wait is bounded: ``timeout_s`` per packet, ``retries`` retransmits of our
last packet, ``max_bytes`` per file.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pvsfarm.bootstrap.tftp.wire import (
    MAX_BLOCK, Ack, Data, Error, Message, OptionAck, ReadRequest, TransferMode, parse, serialize,
)
from pvsfarm.errors import MalformedMessage
from pvsfarm.target.errors import BootFailed
from pvsfarm.target.udp import UdpEndpoint, open_udp

REQUEST_BLKSIZE = 1468
DEFAULT_BLKSIZE = 512  # RFC 1350
MAX_FILE_BYTES = 16 << 20
"""A bootstrap script is a few hundred bytes; an iPXE loader under 1 MiB."""


@dataclass
class _Transfer:
    server: tuple[str, int]
    blksize: int = DEFAULT_BLKSIZE
    tid: tuple[str, int] | None = None
    expected: int = 1
    """Next wire block number wanted (16 bits, rolls over to 0)."""
    received: int = 0
    chunks: list[bytes] = field(default_factory=list)
    done: bool = False


async def tftp_get(server: IPv4Address, filename: str, *, port: int = 69, blksize: int = REQUEST_BLKSIZE,
                   timeout_s: float = 1.0, retries: int = 5, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Download ``filename``; `BootFailed` on an ERROR, garbage, size overrun or silence."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    ep = await open_udp(sock)
    t = _Transfer((str(server), port))
    try:
        last = serialize(ReadRequest(filename, TransferMode.OCTET,
                                     (("blksize", str(blksize)), ("tsize", "0"))))
        ep.send(last, t.server)
        while not t.done:
            msg, addr = await _receive(ep, t, last, timeout_s, retries)
            reply = _handle(t, msg, addr, max_bytes)
            if reply is not None:
                last = reply
                ep.send(last, addr)
    finally:
        ep.close()
    return b"".join(t.chunks)


async def _receive(ep: UdpEndpoint, t: _Transfer, last: bytes, timeout_s: float,
                   retries: int) -> tuple[Message, tuple[str, int]]:
    """The next message from the server (or its TID), retransmitting ``last`` on silence."""
    loop = asyncio.get_running_loop()
    for _attempt in range(retries + 1):
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            try:
                data, addr = await ep.recv(left)
            except TimeoutError:
                break
            if addr[0] != t.server[0] or (t.tid is not None and addr != t.tid):
                continue  # RFC 1350 §4: another host or port; not ours
            try:
                return parse(data), addr
            except MalformedMessage as exc:
                raise BootFailed("tftp", f"garbage from {addr[0]}:{addr[1]}: {exc}") from exc
        ep.send(last, t.tid or t.server)
    raise BootFailed("tftp", f"no answer from {t.server[0]} after {retries} retransmits ({timeout_s:.1f} s each)")


def _handle(t: _Transfer, msg: Message, addr: tuple[str, int], max_bytes: int) -> bytes | None:
    """Apply one message; the bytes to send back (an ACK) or None."""
    if isinstance(msg, Error):
        raise BootFailed("tftp", f"server error {int(msg.code)}: {msg.message or 'no message'}")
    if t.tid is None:
        t.tid = addr
    if isinstance(msg, OptionAck) and t.received == 0:
        options = dict(msg.options)
        try:
            t.blksize = int(options.get("blksize", DEFAULT_BLKSIZE))
        except ValueError as exc:
            raise BootFailed("tftp", f"OACK blksize {options['blksize']!r} is not a number") from exc
        if not 8 <= t.blksize <= 65464:
            raise BootFailed("tftp", f"OACK blksize {t.blksize} out of range (RFC 2348)")
        return serialize(Ack(0))
    if not isinstance(msg, Data):
        raise BootFailed("tftp", f"unexpected {type(msg).__name__} during a read")
    if msg.block != t.expected:
        # A retransmit of the previous block: our ACK was lost; ACK it again.
        return serialize(Ack(msg.block)) if msg.block == (t.expected - 1) & MAX_BLOCK else None
    if len(msg.payload) > t.blksize:
        raise BootFailed("tftp", f"DATA {msg.block} carries {len(msg.payload)} > blksize {t.blksize} octets")
    t.received += len(msg.payload)
    if t.received > max_bytes:
        raise BootFailed("tftp", f"file larger than {max_bytes} bytes")
    t.chunks.append(msg.payload)
    t.expected = (t.expected + 1) & MAX_BLOCK
    t.done = len(msg.payload) < t.blksize
    return serialize(Ack(msg.block))
