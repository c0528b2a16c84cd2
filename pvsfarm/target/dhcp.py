"""The target's DHCP client: DISCOVER → OFFER → REQUEST → ACK (RFC 2131 §3.1), as iPXE does it.

A UDP socket bound to port 68 on one interface (SO_BINDTODEVICE), broadcasting to
255.255.255.255:67 with the BROADCAST flag set: the interface has no address yet,
so replies must come back broadcast (RFC 2131 §4.1). The request says it is iPXE
(option 77 "iPXE", option 93 = 0 x86 BIOS, option 175 present), so a pvsfarm
server answers with the bootstrap script name rather than an iPXE loader.

Replies arrive through a `DhcpPort`, which routes each BOOTREPLY to the exchange
waiting for its (xid, chaddr). A boot opens a private one; many simulated
targets on one interface (a boot storm from one namespace) share one, since
only one socket per interface can usefully own port 68.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Network

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.dhcp.wire import (
    CLIENT_PORT, FLAG_BROADCAST, SERVER_PORT, ClientArch, DhcpMessage, MessageType as MT, Op,
    OptionCode as O, parse, serialize,
)
from pvsfarm.errors import MalformedMessage
from pvsfarm.target.errors import BootFailed

log = logging.getLogger("pvsfarm.target")
BROADCAST = ("255.255.255.255", SERVER_PORT)
IPXE_USER_CLASS = b"iPXE"
IPXE_VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"  # what iPXE's undionly sends
PARAMETER_REQUEST = bytes((O.SUBNET_MASK, O.ROUTER, O.DOMAIN_NAME_SERVER, O.TFTP_SERVER_NAME,
                           O.BOOTFILE_NAME, O.IPXE_ENCAPSULATED))
MAX_REPLIES_PER_TRY = 64
"""Replies looked at per try before giving up on it (e.g. OFFERs from every farm node)."""
MAX_QUEUED_PER_EXCHANGE = 16
"""Replies kept for one waiting exchange; more are dropped, as a full socket buffer would."""


@dataclass(frozen=True, slots=True)
class Lease:
    address: IPv4Address
    prefix_len: int
    server_id: IPv4Address
    tftp_server: IPv4Address
    """Option 66 when it is an address, else siaddr, else the server identifier."""
    boot_file: str
    """Option 67, else the ``file`` field."""
    router: IPv4Address | None
    lease_s: int | None


def dhcp_socket(iface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", CLIENT_PORT))
    except OSError as exc:
        sock.close()
        raise BootFailed("dhcp", f"cannot open a DHCP client socket on {iface}: {exc.strerror}") from exc
    return sock


class DhcpPort(asyncio.DatagramProtocol):
    """Client port 68 on one interface, shared by any number of exchanges: each
    BOOTREPLY goes to the exchange registered for its (xid, chaddr); the rest
    (other clients' replies, garbage) is counted in ``unclaimed`` and dropped."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[tuple[int, bytes], asyncio.Queue[DhcpMessage]] = {}
        self.unclaimed = 0

    @classmethod
    async def open(cls, iface: str, *, rcvbuf_bytes: int | None = None) -> DhcpPort:
        """``rcvbuf_bytes``: a storm's replies arrive in one burst (two servers x N targets);
        the default buffer (~200 KiB) holds a few hundred. Root may exceed rmem_max."""
        sock = dhcp_socket(iface)
        if rcvbuf_bytes:
            force = getattr(socket, "SO_RCVBUFFORCE", None)
            try:
                sock.setsockopt(socket.SOL_SOCKET, force or socket.SO_RCVBUF, rcvbuf_bytes)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        sock.setblocking(False)
        _transport, port = await asyncio.get_running_loop().create_datagram_endpoint(cls, sock=sock)
        return port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse(data)
        except MalformedMessage:
            self.unclaimed += 1
            return
        chaddr = msg.chaddr.packed if isinstance(msg.chaddr, MacAddress) else msg.chaddr
        queue = self.waiting.get((msg.xid, chaddr)) if msg.op == Op.BOOTREPLY else None
        if queue is None or queue.full():
            self.unclaimed += 1
            return
        queue.put_nowait(msg)

    def error_received(self, exc: Exception) -> None:
        pass  # nothing to do: the waiting exchange times out and retransmits

    def register(self, xid: int, mac: MacAddress) -> asyncio.Queue[DhcpMessage]:
        key = (xid, mac.packed)
        if key in self.waiting:
            raise BootFailed("dhcp", f"xid {xid:#010x} already in use for {mac} on this port")
        queue: asyncio.Queue[DhcpMessage] = asyncio.Queue(MAX_QUEUED_PER_EXCHANGE)
        self.waiting[key] = queue
        return queue

    def unregister(self, xid: int, mac: MacAddress) -> None:
        self.waiting.pop((xid, mac.packed), None)

    def send(self, data: bytes, addr: tuple[str, int] = BROADCAST) -> None:
        if self.transport is None or self.transport.is_closing():
            raise BootFailed("dhcp", "the DHCP client port is closed")
        self.transport.sendto(data, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def client_message(kind: MT, mac: MacAddress, xid: int, *extra: tuple[int, bytes],
                   arch: int = ClientArch.X86_BIOS) -> DhcpMessage:
    options = (
        (O.DHCP_MESSAGE_TYPE, bytes((kind,))),
        (O.CLIENT_IDENTIFIER, b"\x01" + mac.packed),
        (O.MAXIMUM_DHCP_MESSAGE_SIZE, (1472).to_bytes(2, "big")),
        (O.CLIENT_SYSTEM_ARCHITECTURE, arch.to_bytes(2, "big")),
        (O.CLIENT_NETWORK_INTERFACE, b"\x01\x02\x01"),  # UNDI 2.1, as iPXE sends
        (O.VENDOR_CLASS_IDENTIFIER, IPXE_VENDOR_CLASS),
        (O.USER_CLASS, IPXE_USER_CLASS),
        *extra,
        (O.PARAMETER_REQUEST_LIST, PARAMETER_REQUEST),
    )
    return DhcpMessage(op=Op.BOOTREQUEST, xid=xid, chaddr=mac, flags=FLAG_BROADCAST, options=options)


async def _await_reply(replies: asyncio.Queue[DhcpMessage], kinds: frozenset[MT], timeout_s: float,
                       server_id: bytes | None) -> DhcpMessage | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for _ in range(MAX_REPLIES_PER_TRY):
        try:
            reply = await asyncio.wait_for(replies.get(), max(deadline - loop.time(), 0.0))
        except TimeoutError:
            return None
        if reply.message_type in kinds and (server_id is None or reply.option(O.SERVER_IDENTIFIER) == server_id):
            return reply
    return None


async def _exchange(port: DhcpPort, replies: asyncio.Queue[DhcpMessage], msg: DhcpMessage,
                    kinds: frozenset[MT], timeout_s: float, tries: int, server_id: bytes | None = None) -> DhcpMessage:
    """Send ``msg`` until a reply of ``kinds`` (from ``server_id`` when given) arrives."""
    for attempt in range(tries):
        port.send(serialize(msg))
        reply = await _await_reply(replies, kinds, timeout_s * (attempt + 1), server_id)
        if reply is not None:
            return reply
        log.info("dhcp: no answer to %s (try %d/%d)", msg.message_type.name if msg.message_type else "?",
                 attempt + 1, tries)
    waited = sum(timeout_s * (i + 1) for i in range(tries))
    raise BootFailed("dhcp", f"no {'/'.join(k.name for k in sorted(kinds))} after {tries} tries ({waited:.1f} s)")


async def obtain_lease(iface: str, mac: MacAddress, *, arch: int = ClientArch.X86_BIOS,
                       timeout_s: float = 1.0, tries: int = 3, port: DhcpPort | None = None) -> Lease:
    """DISCOVER → first OFFER → REQUEST → ACK. Each try waits longer (RFC 2131 §4.1 back-off).
    ``port``: a shared `DhcpPort` on ``iface`` (left open); None opens a private one."""
    own = port is None
    port = port or await DhcpPort.open(iface)
    xid = int.from_bytes(os.urandom(4), "big")
    replies = port.register(xid, mac)
    try:
        offer = await _exchange(port, replies, client_message(MT.DHCPDISCOVER, mac, xid, arch=arch),
                                frozenset({MT.DHCPOFFER}), timeout_s, tries)
        server_id = offer.option(O.SERVER_IDENTIFIER)
        if server_id is None or len(server_id) != 4:
            raise BootFailed("dhcp", "OFFER without a server identifier (option 54)")
        request = client_message(MT.DHCPREQUEST, mac, xid, (O.SERVER_IDENTIFIER, server_id),
                                 (O.REQUESTED_IP_ADDRESS, offer.yiaddr.packed), arch=arch)
        while not replies.empty():  # other servers' OFFERs to the DISCOVER: not an answer to the REQUEST
            replies.get_nowait()
        # Only the chosen server's ACK/NAK counts (RFC 2131 §4.3.2; iPXE's dhcp_request_rx too):
        # an authoritative peer may NAK a REQUEST naming another server.
        ack = await _exchange(port, replies, request, frozenset({MT.DHCPACK, MT.DHCPNAK}), timeout_s, tries,
                              server_id)
    finally:
        port.unregister(xid, mac)
        if own:
            port.close()
    if ack.message_type is MT.DHCPNAK:
        reason = (ack.option(O.MESSAGE) or b"").decode("utf-8", "replace")
        raise BootFailed("dhcp", f"DHCPNAK from {IPv4Address(server_id)}: {reason or 'no reason given'}")
    return lease_from_ack(ack)


def lease_from_ack(ack: DhcpMessage) -> Lease:
    if ack.yiaddr == IPv4Address(0):
        raise BootFailed("dhcp", "ACK without an address (yiaddr 0.0.0.0)")
    server_id = IPv4Address(ack.option(O.SERVER_IDENTIFIER) or ack.siaddr.packed)
    mask = ack.option(O.SUBNET_MASK)
    prefix = IPv4Network(f"0.0.0.0/{IPv4Address(mask)}").prefixlen if mask and len(mask) == 4 else 24
    boot_file = (ack.option(O.BOOTFILE_NAME) or ack.file).rstrip(b"\0").decode("utf-8", "replace")
    if not boot_file:
        raise BootFailed("dhcp", "ACK names no boot file (option 67 / file)")
    router = ack.option(O.ROUTER)
    lease = ack.option(O.IP_ADDRESS_LEASE_TIME)
    return Lease(address=ack.yiaddr, prefix_len=prefix, server_id=server_id,
                 tftp_server=_tftp_server(ack, server_id), boot_file=boot_file,
                 router=IPv4Address(router[:4]) if router and len(router) >= 4 else None,
                 lease_s=int.from_bytes(lease, "big") if lease and len(lease) == 4 else None)


def _tftp_server(ack: DhcpMessage, server_id: IPv4Address) -> IPv4Address:
    name = ack.option(O.TFTP_SERVER_NAME)
    if name:
        try:
            return IPv4Address(name.rstrip(b"\0").decode("ascii", "replace"))
        except AddressValueError:
            log.warning("dhcp: option 66 %r is not an address; using siaddr", name)
    return ack.siaddr if ack.siaddr != IPv4Address(0) else server_id


async def configure_address(iface: str, lease: Lease) -> None:
    """Put the leased address on the interface, as the firmware's stack would (needs root)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "addr", "replace", f"{lease.address}/{lease.prefix_len}", "dev", iface,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError as exc:
        proc.kill()
        raise BootFailed("dhcp", f"`ip addr replace` on {iface} timed out") from exc
    if proc.returncode != 0:
        raise BootFailed("dhcp", f"cannot configure {lease.address} on {iface}: {err.decode().strip()}")
