"""The asyncio side of one read transfer: a socket, a `ReadSession`, a timer.

Raw ``recv``/``send`` on a connected non-blocking socket from an
``add_reader`` callback rather than a DatagramTransport: lock-step TFTP
throughput is the per-block cost, and this skips the transport layer (and
works the same on uvloop, whose transports have their own overheads).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from pvsfarm.bootstrap.tftp.files import FileSource
from pvsfarm.bootstrap.tftp.session import (
    MessageIgnored,
    ReadSession,
    TransferAborted,
    TransferComplete,
    TransferEvent,
    TransferTimedOut,
)
from pvsfarm.bootstrap.tftp.wire import Error, ErrorCode, serialize

__all__ = ["Transfer"]

log = logging.getLogger("pvsfarm.bootstrap.tftp.server")

Address = tuple[str, int]


class Transfer:
    """One read transfer on its own connected socket (the transfer's TID)."""

    def __init__(self, session: ReadSession, source: FileSource, peer: Address, name: str,
                 sock: socket.socket, on_done: Callable[[Address], None]) -> None:
        self.session, self.source, self.peer, self.name = session, source, peer, name
        self.on_done = on_done
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self._on_timer()  # sends the first datagram(s) and arms the timer

    def _on_readable(self) -> None:
        # One datagram per callback: lock-step brings exactly one, and the poller
        # is level-triggered, so a second recv() would only cost an EAGAIN.
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ICMP port unreachable: the client has gone
            log.info("tftp: %r to %s: %s; transfer abandoned", self.name, self.peer, exc)
            self.finish()
            return
        if self.done:
            return
        try:
            events = self.session.receive(data, self.loop.time())
            self._flush()
        except Exception as exc:  # I/O error on the file, or a bug: end this transfer only
            self._crash(exc)
            return
        if events:
            self._log(events)

    def _on_timer(self) -> None:
        self.timer = None
        if self.done:
            return
        try:
            events = self.session.handle_timer(self.loop.time())
            self._flush()
        except Exception as exc:
            self._crash(exc)
            return
        if events:
            self._log(events)

    def _flush(self) -> None:
        session, send = self.session, self.sock.send
        for datagram in session.datagrams_to_send(self.loop.time()):
            try:
                send(datagram)
            except (BlockingIOError, InterruptedError):
                break  # send buffer full: as if lost, the retransmission timer resends
            except OSError as exc:
                log.info("tftp: %r to %s: send failed: %s", self.name, self.peer, exc)
                break
        deadline = session.next_deadline()
        if deadline is None:
            self.finish()  # finished: nothing will ever be resent
        elif self.timer is None or self.timer.when() > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(deadline, self._on_timer)
        # else: the earlier timer stays; when it fires it re-arms from next_deadline()
        # (one call_at per timeout period instead of a cancel + call_at per ACK).

    def _crash(self, exc: Exception) -> None:
        log.exception("tftp: %r to %s failed", self.name, self.peer)
        self._send(serialize(Error(ErrorCode.NOT_DEFINED, f"server error: {type(exc).__name__}")))
        self.finish()

    def _send(self, datagram: bytes) -> None:
        try:
            self.sock.send(datagram)
        except OSError as exc:
            log.info("tftp: %r to %s: send failed: %s", self.name, self.peer, exc)

    def _log(self, events: list[TransferEvent]) -> None:
        for event in events:
            self._log_one(event)

    def _log_one(self, event: TransferEvent) -> None:
        if isinstance(event, TransferComplete):
            log.info(
                "tftp: sent %r to %s (%d bytes, blksize %d, window %d, %d retransmissions)",
                self.name, self.peer, event.size_bytes, self.session.blksize, self.session.windowsize,
                self.session.retransmissions,
            )
        elif isinstance(event, TransferTimedOut):
            log.warning("tftp: %r to %s timed out after %d retries", self.name, self.peer, event.retries)
        elif isinstance(event, TransferAborted):
            who = "we" if event.sent else "client"
            log.info("tftp: %r to %s aborted (%s: %d %s)", self.name, self.peer, who, event.code, event.message)
        elif isinstance(event, MessageIgnored):
            log.debug("tftp: %r to %s: ignored %s", self.name, self.peer, event.reason)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.source.close()
        self.on_done(self.peer)
