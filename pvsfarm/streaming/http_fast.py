"""A fast path for ``GET /boot`` in front of the aiohttp login API, on the same port.

Each connection starts here. A request whose line is ``GET /boot?... HTTP/1.x``
and whose headers are plain (no body, no ``Expect``/``Upgrade``, CRLF line ends)
(``Host`` once, as HTTP/1.1 requires) is answered from `HttpApi.boot_answer`
with one ``transport.write``. Anything
else — another route, another method (HEAD included), a header we do not
handle, a malformed or oversized request — hands the connection, with the bytes
not yet answered, to aiohttp's own protocol, which serves it from then on as
it always did (its 400 and close for malformed input, keep-alive, ranges).

Why not aiohttp for /boot: on this 2-core machine, with 50 clients, aiohttp's
request/response machinery cost ~28 us of a ~60 us login even with a trivial
handler (a bare aiohttp app answers 35k req/s under wrk, an asyncio.Protocol
217k), and the login p99 target (10 ms at 50 concurrent clients) is a
throughput target at heart: the mean latency is 50 / rate.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import unquote_plus

from aiohttp.http import SERVER_SOFTWARE

MAX_HEAD_BYTES = 8190
"""Longer request heads go to aiohttp, which answers them (its line limit is 8190 bytes)."""
KEEPALIVE_S = 75.0
"""Idle keep-alive connections are closed after this long (aiohttp's keepalive_timeout)."""
_HANDED_OVER_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))
_REASONS = {200: b"OK", 400: b"Bad Request", 500: b"Internal Server Error"}
_SERVER = SERVER_SOFTWARE.encode()
_TARGET = bytes(range(0x21, 0x7F))
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FIELD_VALUE = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
"""RFC 9110 5.6.2 tchar and 5.5 field-vchar (+ SP/HTAB): anything else goes to aiohttp's parser."""
log = logging.getLogger(__name__)


class _Date:
    """The ``Date`` header value, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, email.utils.formatdate(second, usegmt=True).encode()
        return cls.value


def _decode(value: str) -> str:
    """A query value decoded as aiohttp (yarl) does; a MAC with ``%3A`` for ``:`` without
    urllib (2.5 -> 0.25 us, once per login)."""
    if "%" not in value and "+" not in value:
        return value
    colons = value.replace("%3A", ":").replace("%3a", ":")
    return colons if "%" not in colons and "+" not in colons else unquote_plus(value)


def boot_query(query: str) -> tuple[str | None, str]:
    """The first ``mac`` and ``exclude`` values of a query string, decoded as aiohttp does."""
    mac: str | None = None
    exclude: str | None = None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        key = _decode(key)
        if key == "mac" and mac is None:
            mac = _decode(value)
        elif key == "exclude" and exclude is None:
            exclude = _decode(value)
    return mac, exclude or ""


def response(status: int, text: str, keep_alive: bool, version: bytes) -> bytes:
    body = text.encode()
    connection = b"" if keep_alive and version == b"HTTP/1.1" else \
        b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n"
    return b"".join((b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                     % (status, _REASONS[status], len(body)), connection, b"Date: ", _Date.now(),
                     b"\r\nServer: ", _SERVER, b"\r\n\r\n", body))


def parse_head(head: bytes) -> tuple[str, bool, bytes] | None:
    """(query, keep-alive, HTTP version) of a plain ``GET /boot?query`` head, else None."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    target = parts[1]
    if not target.startswith(b"/boot?") or target.translate(None, _TARGET) or b"#" in target:
        return None
    version = parts[2]
    keep_alive = version == b"HTTP/1.1"
    hosts = 0
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN) or value.translate(None, _FIELD_VALUE):
            return None  # obs-fold, bare CR or LF, no colon, control bytes: aiohttp's parser decides
        name = name.lower()
        if name == b"host":
            hosts += 1
        elif name in _HANDED_OVER_HEADERS:
            if name != b"content-length" or value.strip() != b"0":
                return None
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
    if hosts > 1 or (hosts == 0 and version == b"HTTP/1.1"):
        return None  # RFC 9112 3.2: a 400, which aiohttp gives
    return target[6:].decode("ascii"), keep_alive, version


class FastBoot(asyncio.Protocol):
    """One connection: answers plain ``GET /boot`` requests, hands anything else to ``fallback()``."""

    def __init__(self, answer: Callable[[str | None, str], tuple[int, str]],
                 fallback: Callable[[], asyncio.Protocol], connections: set[FastBoot]) -> None:
        self.answer = answer
        self.fallback = fallback
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.paused = False
        self.closing = False
        self.last_active = 0.0
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.connections.add(self)
        self.last_active = self.loop.time()
        self.idle = self.loop.call_later(KEEPALIVE_S, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def _forget(self) -> None:
        self.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def _check_idle(self) -> None:
        quiet = self.loop.time() - self.last_active
        if quiet >= KEEPALIVE_S and self.transport is not None:
            self.transport.close()
        else:
            self.idle = self.loop.call_later(KEEPALIVE_S - quiet, self._check_idle)

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()
            self.data_received(b"")

    def eof_received(self) -> bool | None:
        return None  # every complete request was answered in data_received: close

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        self.buffer = b""
        while buf and not self.paused and not self.closing:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES or buf.count(b"\n") != buf.count(b"\r\n") \
                        or not b"GET /boot?".startswith(buf[:10]):
                    return self._hand_over(buf)
                break
            parsed = parse_head(buf[:end]) if end <= MAX_HEAD_BYTES else None
            if parsed is None:
                return self._hand_over(buf)
            query, keep_alive, version = parsed
            buf = buf[end + 4:]
            try:
                status, text = self.answer(*boot_query(query))
            except Exception:  # noqa: BLE001 - as aiohttp: log, answer 500, keep serving others
                log.exception("GET /boot failed")
                status, text, keep_alive = 500, "500 Internal Server Error\n", False
            assert self.transport is not None
            self.transport.write(response(status, text, keep_alive, version))
            if not keep_alive:
                self.closing = True
                self.transport.close()
                return
        self.buffer = buf
        self.last_active = self.loop.time()

    def _hand_over(self, pending: bytes) -> None:
        """aiohttp's protocol serves this connection from here on, starting with ``pending``."""
        transport = self.transport
        assert transport is not None
        self._forget()
        self.transport = None
        protocol = self.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if pending:
            protocol.data_received(pending)


async def start_fast_boot(answer: Callable[[str | None, str], tuple[int, str]],
                          fallback: Callable[[], asyncio.Protocol], host: str, port: int) -> Callable[[], None]:
    """Listen on ``host:port``; returns the function that stops listening and closes fast connections."""
    connections: set[FastBoot] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: FastBoot(answer, fallback, connections), host, port, reuse_address=True, backlog=128)

    def close() -> None:
        server.close()
        for conn in list(connections):
            if conn.transport is not None:
                conn.transport.close()

    return close
