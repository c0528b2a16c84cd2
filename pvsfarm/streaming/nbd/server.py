"""Thin asyncio adapter: one :class:`NbdServerProtocol` per TCP connection.

It feeds received bytes to :class:`~pvsfarm.streaming.nbd.session.ServerSession`,
executes the validated commands on the export's BlockDevice and writes replies
through :class:`~pvsfarm.streaming.nbd.replies.ReplyWriter`.  With a
:class:`~pvsfarm.streaming.nbd.handoff.WorkerPool`, a connection whose export can be
re-opened elsewhere is handed to a worker process once its GO reply is on the wire;
the worker runs this same class from the transmission phase (``handed``).  ``asyncio.Protocol``
(not streams) because it is the fastest asyncio technique measured on this VM; run it
on uvloop with CPython 3.11 (``install_uvloop()``), where stock asyncio halves bulk
throughput (shared/bench/RESULTS.md section 1b).  Peer input never kills the loop: a
protocol violation is logged and closes only that connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pvsfarm.errors import ConfigError
from pvsfarm.streaming.nbd.backend import ExportResolver, OpenedExport, errno_for_exception, release_export
from pvsfarm.streaming.nbd.config import NbdConfig
from pvsfarm.streaming.nbd.replies import ReplyAborted, ReplyWriter
from pvsfarm.streaming.nbd.session import (
    CloseConnection,
    Event,
    ExportInfo,
    ListExports,
    OpenExport,
    SendData,
    ServerSession,
    State,
    WriteCommand,
)
from pvsfarm.streaming.nbd.wire import (Cmd, CmdFlag, Opt, Request, encode_read_chunk, encode_read_error,
                                        encode_simple_reply)

if TYPE_CHECKING:
    from pvsfarm.streaming.nbd.busypoll import BusyPoller
    from pvsfarm.streaming.nbd.handoff import WorkerPool

log = logging.getLogger("pvsfarm.streaming.nbd")

_READ, _FLUSH, _TRIM, _ZERO = int(Cmd.READ), int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES)
_FUA = int(CmdFlag.FUA)
_POLL_SLICE_S = 0.002
"""Longest one callback serves a busy-polled connection before the event loop runs again."""
_perf = time.perf_counter


def install_uvloop() -> bool:
    """Make new event loops uvloop ones; False when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


@dataclass(frozen=True, slots=True)
class Handed:
    """A connection whose handshake another process ran: its export, the bytes that
    process had received but not parsed, and whether it negotiated structured replies."""

    export: OpenedExport
    info: ExportInfo
    pending: bytes = b""
    structured: bool = False


class NbdServerProtocol(asyncio.Protocol):
    """One NBD connection."""

    def __init__(self, resolver: ExportResolver | None, config: NbdConfig, *,
                 pool: WorkerPool | None = None, handed: Handed | None = None,
                 poller: BusyPoller | None = None) -> None:
        self._resolver = resolver
        self._poller = poller
        self._poll_fd = -1  # our own dup of the socket, in the poller's epoll set
        self._config = config
        self._pool = pool
        self._handed = handed
        self._session = ServerSession(
            max_request_bytes=config.max_request_bytes, max_option_bytes=config.max_option_bytes
        )
        self._queue: deque[Event] = deque()
        self._export: OpenedExport | None = None
        self._paused = self._closing = self._hand_off_now = False
        self._handed_to: int | None = None  # connection id in the WorkerPool once handed over
        self._peer: tuple[str, int] = ("", 0)
        self._nread = self._nwritten = 0

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: asyncio.Transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        if self._config.write_high_water_bytes:
            transport.set_write_buffer_limits(high=self._config.write_high_water_bytes)
        sock = transport.get_extra_info("socket")
        cfg = self._config
        if sock is not None and self._handed is None:  # a handed connection keeps its options
            for level, option, name, value in (
                (socket.SOL_SOCKET, socket.SO_SNDBUF, "SO_SNDBUF", cfg.send_buffer_bytes),
                (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT", cfg.notsent_lowat_bytes),
                (socket.IPPROTO_TCP, socket.TCP_CONGESTION, "TCP_CONGESTION", cfg.tcp_congestion.encode()),
            ):
                if value:  # 0 / "": the kernel's own setting stays
                    try:
                        sock.setsockopt(level, option, value)
                    except OSError as exc:  # not fatal: the kernel's stays (the node checks TCP_CONGESTION at start)
                        log.debug("nbd %s: %s %r: %s", self._peer, name, value, exc)
        self._writer = ReplyWriter(transport, cfg.flush_bytes, cfg.sendfile_min_bytes,
                                   loop=asyncio.get_running_loop(), on_idle=self._writer_idle,
                                   on_abort=self._writer_aborted)
        if self._handed is None:
            self._feed(self._session.initiate())
            return
        self._export = self._handed.export
        self._session.resume_transmission(self._handed.info, self._handed.structured)
        if self._poller is not None and sock is not None:
            self._poll_fd = os.dup(sock.fileno())
            self._poller.add(self._poll_fd)
        if self._handed.pending:
            self._feed(self._session.receive_data(self._handed.pending))

    def data_received(self, data: bytes) -> None:
        if not self._queue and not self._paused and not self._closing and not self._writer.busy:
            try:
                self._take(data)
            except Exception:
                log.exception("nbd %s: internal error, closing the connection", self._peer)
                self._abort()
                return
            self._run()
            return
        self._feed(self._session.receive_data(data))

    def _take(self, data: bytes) -> None:
        """Serve or queue what ``data`` asks for, with nothing queued before it (callers
        check): a lone plain READ (queue depth 1) is served at once, without building events."""
        lone = self._session.lone_read(data)
        if lone is not None:
            self._read(*lone, alone=True)
        else:
            self._queue.extend(self._session.receive_data(data))

    def pause_writing(self) -> None:
        self._paused = True
        if not self._closing:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._writer_idle()

    def _writer_idle(self) -> None:
        """The transport drained, or the blocked direct reply is on the wire: go on with the queue."""
        self._run()
        if not self._paused and not self._closing and not self._writer.busy:
            self._transport.resume_reading()

    def _writer_aborted(self, exc: Exception) -> None:
        log.warning("nbd %s: %s", self._peer, exc)
        self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._queue.clear()
        self._report_io()
        self._writer.close()
        if self._poll_fd >= 0:
            assert self._poller is not None
            self._poller.remove(self._poll_fd)
            os.close(self._poll_fd)
            self._poll_fd = -1
        opened, self._export = self._export, None
        if self._handed_to is not None:
            return  # the WorkerPool releases it when the worker reports the close
        try:
            release_export(opened)
        except Exception:
            log.exception("nbd %s: closing the export failed", self._peer)

    # --- event loop ---------------------------------------------------------------

    def _feed(self, events: list[Event]) -> None:
        self._queue.extend(events)
        self._run()

    def _run(self) -> None:
        queue, writer = self._queue, self._writer
        slice_end = 0.0
        try:
            while True:
                while queue and not self._paused and not self._closing and not writer.busy:
                    self._dispatch(queue.popleft())
                if writer.busy:
                    self._transport.pause_reading()  # resumed by _writer_idle
                    break
                if self._closing:
                    break
                writer.flush()
                if self._hand_off_now and not queue:
                    self._hand_off()
                if queue or self._poll_fd < 0 or self._paused:
                    break
                if not slice_end:
                    slice_end = _perf() + _POLL_SLICE_S
                elif _perf() >= slice_end:
                    break
                if not self._poll_next():
                    break
        except Exception:
            log.exception("nbd %s: internal error, closing the connection", self._peer)
            self._abort()
        self._report_io()

    def _poll_next(self) -> bool:
        """Busy-poll for the client's next request (busypoll.py); True when it was read
        and its events are queued.  Only once all we owe is on the wire."""
        assert self._poller is not None
        if self._transport.get_write_buffer_size():
            return False
        data = self._poller.next_input(self._poll_fd)
        if not data:
            return False  # EOF or error: the event loop reads it again and closes
        self._take(data)
        return True

    def _dispatch(self, ev: Event) -> None:
        kind = type(ev)
        if kind is Request:
            self._command(ev)  # type: ignore[arg-type]
        elif kind is SendData:
            self._writer.add(ev.data)  # type: ignore[union-attr]
        elif kind is WriteCommand:
            self._write(ev)  # type: ignore[arg-type]
        elif kind is OpenExport:
            self._open(ev)  # type: ignore[arg-type]
        elif kind is ListExports:
            self._list()
        elif kind is CloseConnection:
            self._close(ev)  # type: ignore[arg-type]

    def _report_io(self) -> None:
        if self._nread or self._nwritten:
            nread, nwritten, self._nread, self._nwritten = self._nread, self._nwritten, 0, 0
            if self._export is not None and self._export.on_io is not None:
                self._export.on_io(nread, nwritten)

    def _abort(self) -> None:
        self._closing = True
        self._queue.clear()
        self._transport.abort()

    def abort(self) -> None:
        """Close now, dropping queued replies (the process is stopping)."""
        if not self._closing:
            self._abort()

    def drop(self) -> None:
        """Close this connection, wherever it is served (drain moves a session away)."""
        if self._handed_to is not None:
            if self._pool is not None:
                self._pool.drop(self._handed_to)
        elif not self._closing:
            self._shut()

    def _hand_off(self) -> None:
        """Send the connection to a worker if everything before is on the wire."""
        self._hand_off_now = False
        export, info = self._export, self._session.export
        spec_of = getattr(export.device, "handoff_spec", None) if export is not None else None
        if self._pool is None or export is None or info is None or spec_of is None:
            return
        if self._session.state is not State.TRANSMISSION or self._transport.get_write_buffer_size():
            return
        pending, spec = self._session.unparsed(), spec_of()
        sock = self._transport.get_extra_info("socket")
        if pending is None or spec is None or sock is None:
            return
        cid = self._pool.hand_off(sock.fileno(), spec, info, pending, export, self._session.structured)
        if cid is None:
            return
        self._handed_to = cid
        self._closing = True
        self._queue.clear()
        self._transport.pause_reading()
        self._transport.abort()  # only our descriptor: the worker holds the socket now

    def _close(self, ev: CloseConnection) -> None:
        if ev.protocol_error:
            log.warning("nbd %s: closing: %s", self._peer, ev.reason)
        else:
            log.debug("nbd %s: closing: %s", self._peer, ev.reason)
        self._shut()

    def _shut(self) -> None:
        """Close after the replies already written (``_abort`` drops them)."""
        self._writer.flush()
        self._closing = True
        self._queue.clear()
        self._transport.close()

    # --- handshake queries --------------------------------------------------------

    def _open(self, ev: OpenExport) -> None:
        opened = None
        try:
            opened = self._resolver.open_export(ev.name, self._peer)
        except Exception:
            log.exception("nbd %s: opening export failed", self._peer)
        info = None
        if opened is not None:
            dev = opened.device
            info = ExportInfo(ev.name, dev.size_bytes, dev.read_only, dev.can_multi_conn, opened.description)
        if ev.option == Opt.INFO:
            release_export(opened)
        else:
            release_export(self._export)
            self._export = opened
            if opened is not None and opened.bind_disconnect is not None and self._transport is not None:
                opened.bind_disconnect(self.drop)
            self._hand_off_now = opened is not None and self._pool is not None
        self._queue.extend(self._session.export_resolved(info))

    def _list(self) -> None:
        try:
            names = self._resolver.list_exports(self._peer)
        except Exception:
            log.exception("nbd %s: listing exports failed", self._peer)
            names = []
        self._queue.extend(self._session.exports_listed(names))

    # --- transmission -------------------------------------------------------------

    def _command(self, req: Request) -> None:
        assert self._export is not None  # the session only validates requests after GO
        typ = req.type
        if typ == _READ:
            self._read(req.handle, req.offset, req.length)
            return
        dev = self._export.device
        try:
            if typ == _FLUSH:
                dev.flush()
            elif typ == _TRIM:
                dev.trim(req.offset, req.length)
            elif typ == _ZERO:
                dev.write_zeroes(req.offset, req.length)
            if typ != _FLUSH and req.flags & _FUA:
                dev.flush()
        except Exception as exc:
            log.warning("nbd %s: command %d failed: %s", self._peer, typ, exc)
            self._writer.add(encode_simple_reply(errno_for_exception(exc), req.handle))
            return
        self._writer.add(encode_simple_reply(0, req.handle))

    def _read(self, handle: int, offset: int, length: int, alone: bool = False) -> None:
        """Answer a READ; ``alone``: nothing else is queued, so the reply may leave at once."""
        assert self._export is not None
        try:
            extents = self._export.device.read_extents(offset, length)
            header = encode_read_chunk(handle, offset, length) if self._session.structured else \
                encode_simple_reply(0, handle)
            if not (alone and self._writer.lone_read_reply(header, extents)):
                self._writer.read_reply(header, extents)
        except ReplyAborted as exc:
            log.warning("nbd %s: %s", self._peer, exc)
            self._abort()
            return
        except Exception as exc:
            log.warning("nbd %s: read %d+%d failed: %s", self._peer, offset, length, exc)
            self._writer.add(encode_read_error(errno_for_exception(exc), handle, self._session.structured))
            return
        self._nread += length

    def _write(self, ev: WriteCommand) -> None:
        assert self._export is not None
        req = ev.request
        try:
            self._export.device.pwrite(req.offset, ev.data, bool(req.flags & _FUA))
        except Exception as exc:
            log.warning("nbd %s: write %d+%d failed: %s", self._peer, req.offset, req.length, exc)
            self._writer.add(encode_simple_reply(errno_for_exception(exc), req.handle))
            return
        self._nwritten += req.length
        self._writer.add(encode_simple_reply(0, req.handle))


def check_tcp_congestion(name: str) -> None:
    """ConfigError unless this process may set ``name`` as a socket's congestion
    control ("" = the system's: always fine); tried on a throw-away socket, so the
    answer is the kernel's (an unloaded module, or one not in
    net.ipv4.tcp_allowed_congestion_control without CAP_NET_ADMIN, fails here)."""
    if not name:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as exc:
            try:
                with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
                    available = f.read().split()
            except OSError:
                available = []
            raise ConfigError(f"nbd.tcp_congestion: cannot use {name!r} ({exc.strerror}); "
                              f"available: {' '.join(available) or 'unknown'}; \"\" keeps the system's") from exc


async def start_nbd_server(
    resolver: ExportResolver,
    host: str | None,
    port: int,
    *,
    config: NbdConfig | None = None,
    reuse_port: bool = False,
    pool: WorkerPool | None = None,
    **overrides: int,
) -> asyncio.AbstractServer:
    """Listen for NBD clients on ``host:port`` (port 0 picks one; see
    ``server.sockets[0].getsockname()``).  ``overrides`` replace NbdConfig fields,
    e.g. ``max_request_bytes=32 * 2**20``.  ``reuse_port`` lets several processes
    share the port (SO_REUSEPORT; the kernel spreads connections over them) -- only
    safe when every process sees the same data, e.g. read-only base images.
    ``pool`` (started) hands connections to worker processes after the handshake."""
    cfg = NbdConfig(**{**asdict(config or NbdConfig()), **overrides})
    check_tcp_congestion(cfg.tcp_congestion)
    loop = asyncio.get_running_loop()
    factory = lambda: NbdServerProtocol(resolver, cfg, pool=pool)  # noqa: E731
    return await loop.create_server(factory, host, port, reuse_port=reuse_port or None)
