"""The node's self-check: real requests to its own listeners, once a second.

Each probe speaks the protocol a target would, with a bounded timeout
(0.5 s: loopback answers in microseconds, so a miss means the service, or
the event loop serving it, is stuck):

- TFTP: an RRQ for ``boot.ipxe`` to the TFTP listen address and port; DATA
  (or OACK) passes, then an ERROR ends the transfer so it holds no slot.
- HTTP: ``GET /health`` answers 200.
- NBD: the 18-octet newstyle greeting ("NBDMAGIC" "IHAVEOPT" flags).

`HealthMonitor` feeds each round to `health.HealthTracker` (the pure
hysteresis) and calls ``on_change(old, new)`` when the verdict changes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pvsfarm.bootstrap.tftp.wire import Data, Error, ErrorCode, OptionAck, ReadRequest, parse, serialize
from pvsfarm.config import NodeConfig
from pvsfarm.errors import MalformedMessage
from pvsfarm.health import HealthState, HealthTracker, ProbeResult
from pvsfarm.streaming.nbd.wire import IHAVEOPT, NBDMAGIC

log = logging.getLogger("pvsfarm.health")
Probe = Callable[[], Awaitable[ProbeResult]]
INTERVAL_S = 1.0
TIMEOUT_S = 0.5
TFTP_PROBE_FILE = "boot.ipxe"
_GREETING = struct.Struct(">QQH")


def connect_host(listen_address: str) -> str:
    """Where to reach a listener bound to ``listen_address`` from this host."""
    if listen_address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listen_address == "::":
        return "::1"
    return listen_address


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


class ProbeFailed(Exception):
    """The service answered, but not as it should (the text says how)."""


class QuietProbes(logging.Filter):
    """Drops the TFTP server's per-transfer log lines about our own probes
    (one "sent"/"aborted" line a second would bury the real ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: collections.deque[tuple[str, int]] = collections.deque(maxlen=16)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(a, tuple) and a in self.peers for a in args)


class _FirstDatagram(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future[tuple[bytes, tuple[str, int]]]) -> None:
        self.answer = answer

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.answer.done():
            self.answer.set_result((data, addr))

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def probe_tftp(host: str, port: int, timeout_s: float = TIMEOUT_S, filename: str = TFTP_PROBE_FILE,
                     quiet: QuietProbes | None = None) -> ProbeResult:
    """RRQ ``filename``; pass on DATA or OACK (the transfer is then cut with ERROR 0)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[tuple[bytes, tuple[str, int]]] = loop.create_future()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: _FirstDatagram(answer),
                                                           local_addr=(host, 0), family=family)
    except OSError as exc:
        return ProbeResult("tftp", False, _reason(exc))
    try:
        if quiet is not None:
            quiet.peers.append(transport.get_extra_info("sockname")[:2])
        transport.sendto(serialize(ReadRequest(filename)), (host, port))
        data, tid = await asyncio.wait_for(answer, timeout_s)
        msg = parse(data)
        if isinstance(msg, (Data, OptionAck)):
            transport.sendto(serialize(Error(ErrorCode.NOT_DEFINED, "health probe done")), tid)
            return ProbeResult("tftp", True)
        if isinstance(msg, Error):
            return ProbeResult("tftp", False, f"error {msg.code}: {msg.message}")
        return ProbeResult("tftp", False, f"unexpected {type(msg).__name__}")
    except (OSError, TimeoutError, MalformedMessage) as exc:
        return ProbeResult("tftp", False, _reason(exc))
    finally:
        transport.close()


async def probe_http(host: str, port: int, timeout_s: float = TIMEOUT_S) -> ProbeResult:
    """``GET /health`` → 200 (the node's own status page)."""
    try:
        status = await asyncio.wait_for(_http_status(host, port, "/health"), timeout_s)
    except (OSError, TimeoutError, ProbeFailed) as exc:
        return ProbeResult("http", False, _reason(exc))
    return ProbeResult("http", status == 200, "" if status == 200 else f"status {status}")


async def _http_status(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        name = f"[{host}]" if ":" in host else host
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {name}:{port}\r\n\r\n".encode())
        line = await reader.readline()
    finally:
        writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ProbeFailed(f"bad status line {line[:40]!r}")
    return int(parts[1])


async def probe_nbd(host: str, port: int, timeout_s: float = TIMEOUT_S) -> ProbeResult:
    """Connect and read the newstyle greeting (NBD protocol, "Newstyle negotiation")."""
    try:
        greeting = await asyncio.wait_for(_nbd_greeting(host, port), timeout_s)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        detail = "closed before the greeting" if isinstance(exc, asyncio.IncompleteReadError) else _reason(exc)
        return ProbeResult("nbd", False, detail)
    magic, opt, _flags = _GREETING.unpack(greeting)
    if magic != NBDMAGIC or opt != IHAVEOPT:
        return ProbeResult("nbd", False, "bad greeting")
    return ProbeResult("nbd", True)


async def _nbd_greeting(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await reader.readexactly(_GREETING.size)
    finally:
        writer.close()


def node_probes(cfg: NodeConfig, quiet: QuietProbes | None = None,
                timeout_s: float = TIMEOUT_S) -> list[Probe]:
    """The probes of every enabled listener of a node configured by ``cfg``."""
    probes: list[Probe] = []
    if cfg.tftp.enabled:
        host = connect_host(cfg.tftp.listen_address)
        probes.append(lambda: probe_tftp(host, cfg.tftp.listen_port, timeout_s, quiet=quiet))
    if cfg.http.enabled:
        probes.append(lambda: probe_http(connect_host(cfg.http.listen_address), cfg.http.listen_port, timeout_s))
    if cfg.nbd.enabled:
        probes.append(lambda: probe_nbd(connect_host(cfg.nbd.listen_address), cfg.nbd.listen_port, timeout_s))
    return probes


def quiet_tftp_logs() -> QuietProbes:
    """A `QuietProbes` filter, installed on the TFTP server's logger."""
    quiet = QuietProbes()
    logging.getLogger("pvsfarm.bootstrap.tftp.server").addFilter(quiet)
    return quiet


@dataclass
class HealthMonitor:
    """Runs ``probes`` every ``interval_s`` and keeps the debounced `state`."""

    probes: list[Probe]
    on_change: Callable[[HealthState, HealthState], None] = lambda old, new: None
    interval_s: float = INTERVAL_S
    tracker: HealthTracker = field(default_factory=HealthTracker)
    rounds: int = 0

    @property
    def state(self) -> HealthState:
        return self.tracker.state

    async def check_once(self) -> HealthState:
        """One round: every probe concurrently (a round lasts at most one timeout)."""
        results = await asyncio.gather(*(probe() for probe in self.probes))
        old = self.tracker.state
        new = self.tracker.observe(results)
        self.rounds += 1
        if new != old:
            self.on_change(old, new)
        return new

    async def run(self) -> None:
        """Check forever (cancel the task to stop); a failing round is logged, not fatal."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive one bad round
                log.exception("health: check round failed")
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))

    def start(self) -> Callable[[], Awaitable[None]]:
        """Run in a task; returns the coroutine function that stops it."""
        task = asyncio.get_running_loop().create_task(self.run(), name="health-monitor")

        async def stop() -> None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

        return stop
