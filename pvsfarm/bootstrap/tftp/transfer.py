"""The asyncio side of one read transfer: a socket, a `ReadSession`, a timer.

Raw ``os.read``/``os.write`` on a connected non-blocking socket from an
``add_reader`` callback rather than a DatagramTransport: lock-step TFTP
throughput is the per-block cost, and this skips the transport layer (and
works the same on uvloop, whose transports have their own overheads).  The
``os`` calls skip the argument tuple of a socket method call, and a small
read size keeps the ACK in CPython's small-object allocator (`RECV_BYTES`).
A window (RFC 7440) goes out as one UDP GSO send (`Transfer._send_run`).

Lock-step throughput is one round trip per block, and on the 2-vCPU bench
VM the costliest part of it is not Python but waking a process that sleeps
on the other CPU (~20 us there).  Measured with atftp, 32 MiB, blksize 1468:
server and client sharing a CPU ~175 MB/s (tftpd-hpa ~200), on two CPUs
~20 MB/s when both sleep (tftpd-hpa alike).  So one callback serves as many
ACKs as come in, without a trip through the poller per block:

1. after sending, recv() at once: a client sharing this CPU, woken by the
   send, has usually answered already;
2. else sched_yield() and recv() again: a client woken on this CPU but not
   yet run answers during the yield;
3. else, once 8 ACKs in a row missed both (`SPIN_AFTER_MISSES`: the client
   runs on another CPU), spin on recv() for up to ``busy_poll_s``, so only
   the client's wake-up is paid (~50 MB/s instead of ~20).  Not sooner:
   spinning makes this CPU look busy and the scheduler then keeps the
   client off it.  This is what ``SO_BUSY_POLL`` does in the kernel for
   NICs (loopback has no NAPI to poll).

Bounded: only while at most ``busy_poll_transfers`` transfers run (a storm
never polls), at most `BUSY_SLICE_S` per callback so the node's event loop
(DHCP, NBD, HTTP) runs between slices, and a spin that times out (a slow or
distant client) backs off exponentially (`pvsfarm.backoff`).  While ACKs
come back in order, the session's work is one `ReadSession.plan` per
read-ahead and a `commit` when the run of windows ends; per block the loop
does a write, a read and a comparison.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

from pvsfarm.backoff import SpinBackoff
from pvsfarm.bootstrap.tftp.files import FileSource
from pvsfarm.bootstrap.tftp.session import (
    MessageIgnored,
    Plan,
    ReadSession,
    TransferAborted,
    TransferComplete,
    TransferEvent,
    TransferTimedOut,
    split_run,
)
from pvsfarm.bootstrap.tftp.wire import Error, ErrorCode, serialize

__all__ = ["Transfer"]

log = logging.getLogger("pvsfarm.bootstrap.tftp.server")

Address = tuple[str, int]

BUSY_SLICE_S = 0.002
"""Longest run of busy-polled blocks in one callback before the event loop
gets a turn (~250 lock-step blocks on loopback; uvloop's clock ticks in ms)."""
RECV_BYTES = 476
"""Read size for the transfer's socket, which only ever gets ACKs (4 octets)
and ERRORs (tftpd-hpa reads them into 516).  Small enough for CPython's
small-object allocator: a 64 KiB read cost a malloc, a heap consolidation and
a shrink per ACK (perf, lock-step on one CPU).  A longer ERROR arrives
truncated, and still ends the transfer (`wire` accepts an ERROR without its NUL)."""
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
"""linux/udp.h (Linux 4.18+); Python 3.11's socket module does not name it."""
GSO_MAX_SEGMENTS = 64
"""Datagrams per GSO send (the kernel's UDP_MAX_SEGMENTS: 64 before 6.x, 128 since)."""
GSO_MAX_BYTES = 65507
"""The largest UDP payload over IPv4, which a GSO send may not exceed either."""
GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.EOPNOTSUPP})
"""What the kernel answers a GSO send it cannot make (udp_send_skb)."""
SPIN_AFTER_MISSES = 8
"""ACKs in a row found neither at once nor after a yield before spinning."""


class Transfer:
    """One read transfer on its own connected socket (the transfer's TID)."""

    def __init__(self, session: ReadSession, source: FileSource, peer: Address, name: str,
                 sock: socket.socket, on_done: Callable[[Address], None],
                 busy_poll_s: float = 0.0, may_busy_poll: Callable[[], bool] = lambda: True) -> None:
        self.session, self.source, self.peer, self.name = session, source, peer, name
        self.on_done = on_done
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.busy_poll_s = busy_poll_s
        self.may_busy_poll = may_busy_poll
        self.busy_hits = 0
        """Datagrams received by busy polling (a test and tuning signal)."""
        self.busy_misses = 0
        """Busy polls that timed out."""
        self.gso_sends = 0
        """Sends of several DATA datagrams cut by the kernel (UDP GSO)."""
        self._backoff = SpinBackoff()  # ACKs to await in the event loop before polling again
        self._misses = 0  # ACKs in a row not there right after the send (see _spinning)
        self._gso_bytes = 0  # longest UDP GSO send (a whole number of DATA datagrams); 0: off
        self._gso_cmsg: list[tuple[int, int, bytes]] = []
        self._lone = session.windowsize == 1  # every run is one datagram: os.write it

    def start(self) -> None:
        if self.session.windowsize > 1:
            self._use_gso()
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self._on_timer()  # sends the first datagram(s) and arms the timer

    def _on_readable(self) -> None:
        # One datagram per callback from the poller: lock-step brings exactly one, and
        # the poller is level-triggered, so a second recv() would only cost an EAGAIN.
        data = self._recv()
        if data is None:
            return
        if self._busy_poll_now():  # decided once per wake-up
            self._serve_polling(data)
            return
        try:  # a storm: one window per wake-up, in one call into the session
            run = self.session.next_run(data, self.loop.time())
        except Exception as exc:  # I/O error on the file, or a bug: end this transfer only
            self._crash(exc)
            return
        if run is None:
            self._receive(data)
            return
        try:
            if self._lone:
                os.write(self.fd, run)
            else:
                self._send_run(run)
        except OSError as exc:
            self._send_failed(exc)

    def _serve_polling(self, data: bytes) -> None:
        """Serve ``data`` and what follows it within one busy-poll slice: each
        next window as soon as the previous one's ACK is read."""
        session, loop_time = self.session, self.loop.time
        slice_end = loop_time() + BUSY_SLICE_S
        while not self.done:
            try:
                plan = session.plan(data)
            except Exception as exc:  # I/O error on the file, or a bug: end this transfer only
                self._crash(exc)
                return
            if plan is not None:
                next_data = self._send_planned(plan, slice_end)
            elif not self._receive(data) or loop_time() >= slice_end or self.done:
                return
            else:
                next_data = self._next_datagram()
            if next_data is None:  # the slice is over, or nothing came within the poll
                return
            data = next_data  # the next plan, or the general path for what came instead

    def _send_planned(self, plan: Plan, slice_end: float) -> bytes | None:
        """Send the plan's runs, each as soon as the previous one's ACK is read
        (per block: a write, a read, a comparison), and commit them.  The
        datagram that ended the plan (the next plan's ACK, or anything else),
        or None: back to the event loop."""
        # `_send_run` and `_next_datagram`, inlined (as in `_on_readable`'s storm path):
        # calling them cost 3-4 % of lock-step throughput (one CPU, atftp 32 MiB, two
        # 5-round A/Bs: 214 -> 205-207 MB/s), and ~1 % of a storm of 50.
        read, write, fd, lone, loop_time = os.read, os.write, self.fd, self._lone, self.loop.time
        runs, acks, start = plan
        sent = 0
        data: bytes | None = None
        for i in range(start, len(runs)):
            try:
                if lone:
                    write(fd, runs[i])
                else:
                    self._send_run(runs[i])
            except OSError as exc:
                self._send_failed(exc)
            sent += 1
            if not sent & 15 and loop_time() >= slice_end:
                data = None
                break
            try:  # a client sharing this CPU, woken by the send, has usually answered already
                data = read(fd, RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                data = self._poll()
            except OSError as exc:
                data = self._abandon(exc)
            else:
                self._misses = 0
            if data != acks[i]:  # anything else (None: nothing came) ends the plan
                break
        self.session.commit(sent, loop_time())
        return data

    def _next_datagram(self) -> bytes | None:
        """The next datagram, at once or within the busy poll; None: back to
        the event loop, which wakes this transfer when one arrives."""
        try:  # a client sharing this CPU, woken by send(), has usually answered already
            data = os.read(self.fd, RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return self._poll()
        except OSError as exc:
            return self._abandon(exc)
        self._misses = 0
        return data

    def _send_run(self, run: bytes) -> None:
        """A run of DATA datagrams (`ReadSession.plan`): one UDP GSO send
        (``UDP_SEGMENT``) per `_gso_bytes`, so a window costs one system call
        instead of one per block; else one send per datagram.  Per send, not
        as a socket option, which would subject single datagrams (the OACK, a
        lone resent block) to the kernel's GSO checks too."""
        step = self._gso_bytes
        if step and len(run) > self.session.blksize + 4:
            try:
                for offset in range(0, len(run), step):
                    self.sock.sendmsg([run[offset : offset + step] if len(run) > step else run], self._gso_cmsg)
                    self.gso_sends += 1
                return
            except OSError as exc:
                if exc.errno not in GSO_REFUSED:
                    raise
                # the route's device cannot segment (no checksum offload, IPsec): no GSO
                log.info("tftp: %r to %s: UDP GSO refused (%s); one send per block", self.name, self.peer, exc)
                self._gso_bytes = 0
        for datagram in split_run(run, self.session.blksize):
            os.write(self.fd, datagram)

    def _use_gso(self) -> None:
        """Cut windows by UDP GSO: whole datagrams, at most `GSO_MAX_SEGMENTS`
        and `GSO_MAX_BYTES` per send.  Only a device with checksum offload can
        (loopback, veth, most NICs); `_send_run` turns it off for the transfer
        when the kernel refuses."""
        size = self.session.blksize + 4
        count = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
        if count > 1:
            self._gso_bytes = size * count
            self._gso_cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]

    def _spinning(self) -> bool:
        """Whether to spin for an ACK that was not there right after the send,
        nor after yielding the CPU once.  Not at first: while ACKs come back at
        once (the client shares this CPU), sleeping in the event loop keeps the
        scheduler packing the two together; spinning would make this CPU look
        busy and move the client away.  After `SPIN_AFTER_MISSES` misses in a
        row the client runs elsewhere, and spinning saves this side's wake-up."""
        if self._misses < SPIN_AFTER_MISSES:
            self._misses += 1
            return False
        return True

    def _receive(self, data: bytes) -> bool:
        """The general path for one datagram; False if the transfer crashed."""
        try:
            events = self.session.receive(data, self.loop.time())
            self._flush()
        except Exception as exc:  # I/O error on the file, or a bug: end this transfer only
            self._crash(exc)
            return False
        if events:
            self._log(events)
        return True

    def _recv(self) -> bytes | None:
        try:
            return os.read(self.fd, RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return self._abandon(exc)

    def _abandon(self, exc: OSError) -> None:
        # ICMP port unreachable (reported once, by the recv that fails): the client has gone
        if not self.done:
            log.info("tftp: %r to %s: %s; transfer abandoned", self.name, self.peer, exc)
            self.finish()

    def _send_failed(self, exc: OSError) -> None:
        if not isinstance(exc, (BlockingIOError, InterruptedError)):
            log.info("tftp: %r to %s: send failed: %s", self.name, self.peer, exc)
        # else the send buffer is full: as if lost, the retransmission timer resends

    def _busy_poll_now(self) -> bool:
        if self.busy_poll_s <= 0:
            return False
        if self._backoff.skipping():
            return False
        return self.may_busy_poll()

    def _poll(self) -> bytes | None:
        """The next datagram if it arrives within ``busy_poll_s``; None (back to
        the event loop, which wakes this transfer when it does) otherwise."""
        read, fd, monotonic, sched_yield = os.read, self.fd, time.monotonic, os.sched_yield
        until = 0.0
        while True:
            sched_yield()  # a client woken on this CPU by our send gets to answer
            try:
                data = read(fd, RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                if not until:  # the client is not on this CPU
                    if not self._spinning():
                        return None
                    until = monotonic() + self.busy_poll_s
                elif monotonic() >= until:
                    self.busy_misses += 1
                    self._backoff.timed_out()
                    return None
                continue
            except OSError as exc:
                return self._abandon(exc)
            if until:
                self._backoff.caught()
                self.busy_hits += 1
            else:
                self._misses = 0
            return data

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
        try:
            for datagram in session.datagrams_to_send(self.loop.time()):
                send(datagram)
        except OSError as exc:
            self._send_failed(exc)
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
                "tftp: sent %r to %s (%d bytes, blksize %d, window %d, %d retransmissions, busy polls %d/%d, "
                "GSO sends %d)",
                self.name, self.peer, event.size_bytes, self.session.blksize, self.session.windowsize,
                self.session.retransmissions, self.busy_hits, self.busy_hits + self.busy_misses, self.gso_sends,
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
