"""How replies reach the socket: batched ``writelines`` and opportunistic ``os.sendfile``.

Measured on this VM (shared/bench/RESULTS.md section 1): answering every request of a
received chunk and flushing with one ``transport.writelines`` capped at ~256 KiB, with
back-pressure, is the fastest asyncio technique for 4 KiB reads; ``loop.sendfile`` per
request is 4-7x slower and is not used; raw ``os.sendfile`` helps large sequential reads.
Raw writes bypass the transport, so they are only safe while the transport holds no
buffered data: then the kernel socket buffer already has everything sent before, and
order is kept.  If the socket fills mid-reply, the writer is ``busy``: it waits for the
socket to drain (``add_writer`` on its own dup of the socket) and goes on with
``sendfile``, and the connection dispatches nothing meanwhile (``on_idle`` resumes
it).  Copying the rest through the transport instead (``os.pread``) carried 18 % of the
bytes of a qemu-img convert (2 MiB reads) through user space.  Without an event loop
(``loop=None``, unit tests) the rest still goes through the transport.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Callable, Sequence

from pvsfarm.streaming.nbd.backend import Extent

_ZEROS = memoryview(bytes(1 << 20))
LONE_READ_MAX_BYTES = 128 * 2**10
"""Largest READ `ReplyWriter.lone_read_reply` sends from its scratch buffer."""
_scratch: list[memoryview] = []  # that buffer: one per process, made on first use


class ReplyAborted(Exception):
    """A reply failed after its header was sent: the connection must be closed hard
    (spec "NBD_CMD_READ": an error after a zero error field -> hard disconnect)."""


def zeros(length: int) -> bytes | memoryview:
    """``length`` zero bytes, shared for up to 1 MiB."""
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)


def read_extent(extent: Extent, skip: int = 0) -> bytes | memoryview:
    """The bytes of ``extent`` after its first ``skip`` bytes; OSError if short."""
    length = extent.length - skip
    if extent.fd < 0:
        return zeros(length)
    data = os.pread(extent.fd, length, extent.file_offset + skip)
    if len(data) != length:
        raise short_read(len(data), length)
    return data


def short_read(got: int, wanted: int) -> OSError:
    """The error of a read that returned fewer bytes than the extent holds (the file
    shrank under us): EIO, which the caller answers to the client."""
    return OSError(errno.EIO, f"short read: {got} of {wanted} bytes")


class ReplyWriter:
    """Collects reply parts and writes them to ``transport`` in batches."""

    def __init__(self, transport: asyncio.Transport, flush_bytes: int, sendfile_min_bytes: int, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_idle: Callable[[], None] | None = None,
                 on_abort: Callable[[Exception], None] | None = None) -> None:
        self._transport = transport
        self._loop = loop
        self._on_idle = on_idle
        self._on_abort = on_abort
        self._rest: list[bytes | list[int]] = []  # what a blocked direct reply still has to send
        self._flush_bytes = flush_bytes
        self._sendfile_min = sendfile_min_bytes
        self._parts: list[bytes | memoryview] = []
        self._size = 0
        self._sock_fd = -1
        self._sock: socket.socket | None = None
        if sendfile_min_bytes > 0:
            sock = transport.get_extra_info("socket")
            self._sock_fd = sock.fileno() if sock is not None else -1
            if self._sock_fd >= 0:
                # uvloop's pseudo-socket refuses send(); a dup lets us pass MSG_MORE so the
                # 16-byte header leaves in the same segment as the sendfile data
                self._sock = socket.socket(fileno=os.dup(self._sock_fd))
        # reads at least this long try the raw path; "never" when sendfile is off
        self._sendfile_direct_min = sendfile_min_bytes if self._sock_fd >= 0 else 1 << 63

    def add(self, data: bytes | memoryview) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            parts, self._parts, self._size = self._parts, [], 0
            self._transport.writelines(parts)

    def read_reply(self, header: bytes, extents: Sequence[Extent]) -> None:
        """Queue a successful READ reply: ``header`` (a simple reply, or the header of a
        structured OFFSET_DATA chunk) and the extents' data.  OSError before anything is
        queued (the caller answers EIO); ReplyAborted once part of it is on the wire."""
        if len(extents) == 1:
            ext = extents[0]
            total = ext.length
            if total < self._sendfile_direct_min:
                data = os.pread(ext.fd, total, ext.file_offset) if ext.fd >= 0 else zeros(total)
                if len(data) != total:
                    raise short_read(len(data), total)
                self._parts += (header, data)
                self._size += total + len(header)
                if self._size >= self._flush_bytes:
                    self.flush()
                return
        else:
            total = sum(e.length for e in extents)
        if total >= self._sendfile_direct_min:
            self.flush()
            if self._transport.get_write_buffer_size() == 0:
                self._send_direct(header, extents)
                return
        parts = [read_extent(e) for e in extents]
        self.add(header)
        for part in parts:
            self.add(part)

    def lone_read_reply(self, header: bytes, extents: Sequence[Extent]) -> bool:
        """Send a READ's reply at once with one ``os.writev``, when it is all there is to
        send: nothing batched or blocked here, nothing buffered in the transport, one
        extent under the sendfile size.  The data is read into a scratch buffer shared by
        the process, so nothing is allocated per request, and what the socket does not
        take goes to the transport, copied.  fio 4K QD1, one connection, a plain file:
        18.6k -> 20.5k IOPS against ``read_reply`` + ``flush`` through uvloop's
        ``writelines`` (10 paired runs, ratios 1.00-1.14), with the same system calls
        (strace); where the time went in ``writelines`` was not isolated.  False, with
        nothing done, when those conditions do not hold (use ``read_reply``); OSError
        before anything is sent if the read fails (the caller answers EIO)."""
        if len(extents) != 1 or self._parts or self._rest or self._sock_fd < 0:
            return False
        ext = extents[0]
        length = ext.length
        if length > LONE_READ_MAX_BYTES or length >= self._sendfile_direct_min or \
                self._transport.get_write_buffer_size():
            return False
        if ext.fd < 0:
            data = zeros(length)
        else:
            if not _scratch:
                _scratch.append(memoryview(bytearray(LONE_READ_MAX_BYTES)))
            data = _scratch[0][:length]
            got = os.preadv(ext.fd, [data], ext.file_offset)
            if got != length:
                raise short_read(got, length)
        try:
            sent = os.writev(self._sock_fd, (header, data))
        except OSError:
            sent = 0  # socket full, or the connection failed: the transport takes it all (and reports a failure)
        if sent < len(header) + length:
            self._transport.write(b"".join((header, data))[sent:])
        return True

    @property
    def busy(self) -> bool:
        """A direct reply is waiting for socket space: write nothing else until ``on_idle``."""
        return bool(self._rest)

    def _send_direct(self, header: bytes, extents: Sequence[Extent]) -> None:
        assert self._sock is not None  # the direct path is only taken with a socket
        self._rest = [header, *([e.fd, e.file_offset, e.length] for e in extents)]
        try:
            if self._pump():
                return
            if self._loop is not None:
                self._loop.add_writer(self._sock.fileno(), self._writable)
                return
            # no event loop (unit tests): the rest goes through the transport, after
            # the bytes already on the socket
            rest, self._rest = self._rest, []
            self._transport.writelines([p if isinstance(p, bytes) else read_extent(Extent(*p)) for p in rest])
        except OSError as exc:
            self._rest = []
            raise ReplyAborted(f"read reply failed mid-send: {exc}") from exc

    def _pump(self) -> bool:
        """Send what the blocked reply still has; True once all of it is on the wire."""
        rest, sock = self._rest, self._sock
        assert sock is not None
        while rest:
            piece = rest[0]
            if isinstance(piece, bytes):
                try:
                    n = sock.send(piece, socket.MSG_MORE)
                except BlockingIOError:
                    return False
                if n < len(piece):
                    rest[0] = piece[n:]
                    return False
            else:
                fd, offset, left = piece
                try:
                    if fd < 0:
                        n = sock.send(zeros(min(left, len(_ZEROS))), socket.MSG_MORE)
                    else:
                        n = os.sendfile(self._sock_fd, fd, offset, left)
                except BlockingIOError:
                    return False
                if n == 0:
                    raise OSError(errno.EIO, "backing file shorter than the extent")
                piece[1], piece[2] = offset + n, left - n
                if left > n:
                    continue
            del rest[0]
        return True

    def _writable(self) -> None:
        assert self._loop is not None and self._sock is not None
        try:
            done = self._pump()
        except OSError as exc:
            self._loop.remove_writer(self._sock.fileno())
            self._rest = []
            if self._on_abort is not None:
                self._on_abort(ReplyAborted(f"read reply failed mid-send: {exc}"))
            return
        if done:
            self._loop.remove_writer(self._sock.fileno())
            if self._on_idle is not None:
                self._on_idle()

    def close(self) -> None:
        if self._sock is not None:
            if self._rest and self._loop is not None:
                self._loop.remove_writer(self._sock.fileno())
            self._rest = []
            self._sock.close()
            self._sock = None
