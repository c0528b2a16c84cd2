"""The asyncio TFTP server: a thin adapter around `ReadSession`.

One listening socket takes requests (with IP_PKTINFO, so each transfer
answers from the address the client asked: a VIP or a secondary address);
each read transfer gets its own ephemeral UDP socket connected to the client
(RFC 1350 §4: the pair of ports is the transfer's TID, and the kernel then
drops datagrams from other TIDs), one `ReadSession` and one timer re-armed
from `next_deadline()` (see `transfer.py`).  Write requests are refused
(ERROR 2): pvsfarm serves boot files, it never stores them.

Peer input never escapes as an exception: malformed datagrams are logged and
dropped, refused requests get an ERROR from the listening socket.  Run it
under uvloop for throughput (bench: lock-step +15-100 % over stock asyncio).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pvsfarm.bootstrap.tftp import files
from pvsfarm.bootstrap.tftp.run_cache import RunCache
from pvsfarm.bootstrap.tftp.session import MAX_BLKSIZE, ReadSession, SessionLimits
from pvsfarm.bootstrap.tftp.transfer import Transfer
from pvsfarm.bootstrap.tftp.wire import (
    Error,
    ErrorCode,
    ReadRequest,
    TransferMode,
    WriteRequest,
    parse,
    serialize,
)
from pvsfarm.errors import MalformedMessage, RemoteProtocolError

__all__ = ["DynamicFiles", "TftpServer", "TftpSettings", "start_tftp_server"]

log = logging.getLogger(__name__)

Address = tuple[str, int]
DynamicFiles = Callable[[str, Address], "bytes | None"]
"""``dynamic(name, client_address)`` → content to serve for the root-relative
``name``, or None to fall through to the file under the root."""


SHARED_FILE_MAX_BYTES = 8 * 1024 * 1024
"""Largest file whose DATA transfers share through the run cache.  Boot
loaders (undionly.kpxe ~70 KiB, ipxe.efi ~1 MiB) are fetched by every
target: a shared 1 MiB file went 111 -> 117 MB/s (atftp, one CPU).  A large
one is colder in the CPU's caches than a fresh read-ahead, and two layouts
of it evicted each other: 32 MiB with windowsize 8 went 444 -> 406 MB/s."""


@dataclass(frozen=True, slots=True)
class TftpSettings:
    """Configuration of one TFTP server."""

    root: Path
    """Directory served; nothing outside it is ever read."""
    host: str = "0.0.0.0"
    """Address to listen on (and to send transfers from)."""
    port: int = 69
    """UDP port for requests (RFC 1350: 69); 0 picks an ephemeral port."""
    max_transfers: int = 500
    """Concurrent transfers; beyond it a request gets ERROR 0 "busy".
    Each holds one socket and at most one descriptor (1024-fd default ulimit)."""
    timeout_s: float = 1.0
    """Retransmission timeout unless the client negotiates one (RFC 2349)."""
    max_retries: int = 5
    """Retransmissions of one window before a transfer is abandoned."""
    max_blksize: int = MAX_BLKSIZE
    """Ceiling of the blksize option in octets (RFC 2348: 65464)."""
    max_windowsize: int = 64
    """Ceiling of the windowsize option in blocks (RFC 7440)."""
    reuse_port: bool = False
    """SO_REUSEPORT: several processes may listen on one port and the kernel
    spreads clients among them by address hash: one process per core is how a
    single-threaded server uses every core in a boot storm (bench: 2 workers)."""

    busy_poll_us: int = 50
    """How long a transfer whose client runs on another CPU spins for the ACK
    before sleeping in the event loop; 0 disables (see `transfer.py`).  Bench
    VM, 32 MiB lock-step on two vCPUs, interleaved A/B: 0 us ~20 MB/s, 50 us
    ~50, 100 us ~53 (the ACK comes back within ~25 us); but in another state
    of that VM, ACKs caught by 100 us spins came ~80 us late and curl ran at
    12-19 MB/s instead of ~20: a 50 us spin gives up on those and backs off.
    Keep it far below ``timeout_s``: no timer fires during a spin."""
    busy_poll_transfers: int = 2
    """Busy polling only while at most this many transfers run: with more,
    the event loop always has another socket ready and polling one would
    delay the others (a boot storm never polls)."""
    run_cache_bytes: int = 64 * 1024 * 1024
    """DATA laid out for files under the root, kept for the next transfers
    of the same file version (`session.RunCache`); 0 disables.  A 1 MiB
    loader costs ~1 MiB per blksize/windowsize pair the clients ask for.
    Only files up to `SHARED_FILE_MAX_BYTES` are shared."""

    def limits(self) -> SessionLimits:
        return SessionLimits(self.timeout_s, self.max_retries, self.max_blksize, self.max_windowsize)


class TftpServer:
    """A running server: `port`, `active_transfers`, `close()`."""

    def __init__(self, settings: TftpSettings, dynamic: DynamicFiles | None) -> None:
        self.settings = settings
        self._dynamic = dynamic
        self._limits = settings.limits()
        self.run_cache = RunCache(settings.run_cache_bytes) if settings.run_cache_bytes > 0 else None
        """DATA shared between transfers of one file version (hits/misses: a tuning signal)."""
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transfers: dict[Address, Transfer] = {}
        self.dropping = False
        """Fault injection (tests): read and drop every request, as a hung server."""
        self.busy_poll_hits = 0
        """Datagrams of finished transfers received by busy polling (see `transfer.py`)."""
        self.gso_sends = 0
        """UDP GSO sends (several DATA datagrams each) of finished transfers."""

    def listen(self, sock: socket.socket) -> None:
        """Serve requests arriving on ``sock`` (bound, non-blocking, PKTINFO on)."""
        self._sock, self._loop = sock, asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("server not started")
        return int(self._sock.getsockname()[1])

    @property
    def active_transfers(self) -> int:
        return len(self._transfers)

    def close(self) -> None:
        """Stop listening and abandon every transfer in progress."""
        if self._sock is not None and self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        for transfer in list(self._transfers.values()):
            transfer.finish()

    def _on_readable(self) -> None:
        # Requests come in bursts (a boot storm): drain up to 64 per wake-up.
        for _ in range(64):
            if self._sock is None or self._sock.fileno() < 0:
                return
            try:
                data, ancillary, _, peer = self._sock.recvmsg(65536, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors queued by an earlier reply
                log.debug("tftp: listener: %s", exc)
                return
            if not self.dropping:
                self.on_request(data, peer, _destination(ancillary))

    def on_request(self, data: bytes, peer: Address, local_ip: str | None = None) -> None:
        """Handle one datagram sent to the request port from ``peer`` (to ``local_ip``)."""
        try:
            msg = parse(data)
        except MalformedMessage as exc:
            log.debug("tftp: dropped malformed request from %s: %s", peer, exc)
            return
        if not isinstance(msg, (ReadRequest, WriteRequest)):
            log.debug("tftp: dropped %s sent to the request port by %s", type(msg).__name__, peer)
            return  # no reply: stray DATA/ACK/ERROR must not make us a reflector
        if peer in self._transfers:
            return  # the client retransmitted its RRQ: the transfer already answers
        try:
            request = self._check(msg)
            source = self._open(request.filename, peer)
        except RemoteProtocolError as exc:
            log.info("tftp: refused %s %r from %s: %s", type(msg).__name__, msg.filename, peer, exc)
            self._reply(Error(exc.code, str(exc)), peer)
            return
        except Exception:  # a failing dynamic hook must not kill the listener
            log.exception("tftp: cannot serve %r to %s", msg.filename, peer)
            self._reply(Error(ErrorCode.NOT_DEFINED, "internal error"), peer)
            return
        try:
            sock = self._transfer_socket(peer, local_ip or self.settings.host)
        except OSError:
            source.close()
            log.exception("tftp: no socket for %r to %s", request.filename, peer)
            self._reply(Error(ErrorCode.NOT_DEFINED, "server error"), peer)
            return
        key = source.key if source.size_bytes <= SHARED_FILE_MAX_BYTES else None
        session = ReadSession.start(request, source.size_bytes, source.read_at, self._limits, self.run_cache, key)
        transfer = self._transfers[peer] = Transfer(
            session, source, peer, request.filename, sock, self._release,
            self.settings.busy_poll_us / 1e6, self._may_busy_poll,
        )
        transfer.start()

    def _check(self, msg: ReadRequest | WriteRequest) -> ReadRequest:
        if isinstance(msg, WriteRequest):
            raise RemoteProtocolError("write requests are not accepted", code=ErrorCode.ACCESS_VIOLATION)
        if msg.mode is TransferMode.MAIL:
            raise RemoteProtocolError("mail mode is not supported", code=ErrorCode.ILLEGAL_OPERATION)
        if len(self._transfers) >= self.settings.max_transfers:
            raise RemoteProtocolError("server busy, try again", code=ErrorCode.NOT_DEFINED)
        return msg

    def _open(self, filename: str, peer: Address) -> files.FileSource:
        name = files.normalize_name(filename)
        if self._dynamic is not None:
            content = self._dynamic(name, peer)
            if content is not None:
                return files.source_from_bytes(content)
        return files.open_in_root(self.settings.root, name)

    def _transfer_socket(self, peer: Address, local_ip: str) -> socket.socket:
        """A new TID: an ephemeral port on the address the client sent its request
        to (a VIP or a second address on the NIC), connected to the client's port."""
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((local_ip, 0))
            sock.connect(peer)
        except OSError:
            sock.close()
            raise
        return sock

    def _reply(self, msg: Error, peer: Address) -> None:
        if self._sock is not None and self._sock.fileno() >= 0:
            try:
                self._sock.sendto(serialize(msg), peer)
            except OSError as exc:  # full buffer or unreachable: the client will retry
                log.debug("tftp: cannot answer %s: %s", peer, exc)

    def _may_busy_poll(self) -> bool:
        return len(self._transfers) <= self.settings.busy_poll_transfers

    def _release(self, peer: Address) -> None:
        transfer = self._transfers.pop(peer, None)
        if transfer is not None:
            self.busy_poll_hits += transfer.busy_hits
            self.gso_sends += transfer.gso_sends


# Linux values; Python 3.11's socket module lacks IP_PKTINFO (<netinet/in.h>: 8).
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def _listening_socket(settings: TftpSettings) -> socket.socket:
    """The request socket, asking the kernel for each datagram's destination
    address (IP_PKTINFO), so replies leave from the address the client used."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if settings.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((settings.host, settings.port))
    except OSError:
        sock.close()
        raise
    return sock


def _destination(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    """The request's destination address from IP(V6)_PKTINFO, if present."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])  # struct in_pktinfo.ipi_addr
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])  # struct in6_pktinfo.ipi6_addr
    return None


async def start_tftp_server(settings: TftpSettings, dynamic: DynamicFiles | None = None) -> TftpServer:
    """Listen on ``settings.host:settings.port`` and serve read requests."""
    server = TftpServer(settings, dynamic)
    server.listen(_listening_socket(settings))
    log.info("tftp: serving %s on %s:%d", settings.root, settings.host, server.port)
    return server
