"""The ``GET /boot`` fast path in front of aiohttp: same answers, everything else handed to aiohttp."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from pvsfarm.streaming.http_fast import MAX_HEAD_BYTES, boot_query, parse_head, start_fast_boot

# -- pure parts ---------------------------------------------------------------


@pytest.mark.parametrize(("head", "parsed"), [
    (b"GET /boot?mac=1 HTTP/1.1\r\nHost: a", ("mac=1", True, b"HTTP/1.1")),
    (b"GET /boot?mac=1 HTTP/1.1\r\nHost: a\r\nConnection: close", ("mac=1", False, b"HTTP/1.1")),
    (b"GET /boot?mac=1 HTTP/1.1\r\nconnection: Upgrade-Not, CLOSE\r\nhost: a", ("mac=1", False, b"HTTP/1.1")),
    (b"GET /boot?mac=1 HTTP/1.0", ("mac=1", False, b"HTTP/1.0")),  # Host is optional in HTTP/1.0
    (b"GET /boot?mac=1 HTTP/1.0\r\nConnection: keep-alive", ("mac=1", True, b"HTTP/1.0")),
    (b"GET /boot?mac=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0", ("mac=1", True, b"HTTP/1.1")),
    (b"GET /boot?mac=1 HTTP/1.1\r\nUser-Agent: iPXE/1.21.1+ (g9)\r\nX:\r\nHost: a", ("mac=1", True, b"HTTP/1.1")),
])
def test_plain_boot_requests_are_taken(head: bytes, parsed: tuple[str, bool, bytes]) -> None:
    assert parse_head(head) == parsed


@pytest.mark.parametrize("head", [
    b"HEAD /boot?mac=1 HTTP/1.1",  # aiohttp runs HEAD
    b"GET /boot.json?mac=1 HTTP/1.1", b"GET /boot HTTP/1.1", b"GET /bootx?mac=1 HTTP/1.1",
    b"GET http://a/boot?mac=1 HTTP/1.1", b"GET /boot?mac=1#f HTTP/1.1", b"GET /boot?m\x01 HTTP/1.1",
    b"GET /boot?mac=1 HTTP/2.0", b"GET /boot?mac=1  HTTP/1.1", b"GET /boot?mac=1 HTTP/1.1 x", b"get /boot?a HTTP/1.1",
    b"GET /boot?mac=1 HTTP/1.1\r\nContent-Length: 3", b"GET /boot?mac=1 HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"GET /boot?mac=1 HTTP/1.1\r\nExpect: 100-continue", b"GET /boot?mac=1 HTTP/1.1\r\nUpgrade: h2c",
    b"GET /boot?mac=1 HTTP/1.1\r\nNo colon", b"GET /boot?mac=1 HTTP/1.1\r\n folded: x",
    b"GET /boot?mac=1 HTTP/1.1\r\nHost : a", b"GET /boot?mac=1 HTTP/1.1\r\nHost: a\rb",
    b"GET /boot?mac=1 HTTP/1.1\r\nHost: a\x00", b"GET /boot?mac=1 HTTP/1.1\r\n: a",
    b"GET /boot?mac=1 HTTP/1.1", b"GET /boot?mac=1 HTTP/1.1\r\nHost: a\r\nHost: b",  # Host missing or twice
])
def test_anything_else_is_left_to_aiohttp(head: bytes) -> None:
    assert parse_head(head) is None


_QUERY_CHARS = st.sampled_from(list("mace=xlud&%+:-3AaF0;/ ?") + ["%3A", "%2B", "%26", "%3D", "%25"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_QUERY_CHARS, max_size=30).map("".join))
def test_query_values_decode_as_aiohttp_decodes_them(query: str) -> None:
    query = query.replace(" ", "%20")
    try:
        expected = URL("/boot?" + query).query
    except ValueError:
        return
    assert boot_query(query) == (expected.get("mac"), expected.get("exclude", "") or "")


# -- a real listener: stub login answer, real aiohttp app behind it ----------

Answer = Callable[[str | None, str], tuple[int, str]]


def stub_answer(mac: str | None, exclude: str) -> tuple[int, str]:
    if mac == "boom":
        raise RuntimeError("a bug in the login")
    if mac is None or mac == "bad":
        return 400, "invalid MAC address\n"
    return 200, f"#!ipxe\necho {mac} {exclude}\n"


@pytest.fixture
async def server() -> AsyncIterator[int]:
    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="healthy\n")

    async def boot(_request: web.Request) -> web.Response:
        return web.Response(text="from aiohttp\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/boot", boot)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = await start_fast_boot(stub_answer, runner.server, "127.0.0.1", port)
    try:
        yield port
    finally:
        stop()
        await runner.cleanup()


def exchange(port: int, chunks: list[bytes], wait_s: float = 1.0) -> tuple[bytes, bool]:
    """Send ``chunks`` one by one; (everything read, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
        out = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return out, True
                out += data
        except TimeoutError:
            return out, False


async def talk(port: int, chunks: list[bytes], wait_s: float = 1.0) -> tuple[bytes, bool]:
    return await asyncio.get_running_loop().run_in_executor(None, exchange, port, chunks, wait_s)


def bodies(raw: bytes) -> list[tuple[int, str]]:
    """(status, body) of each response in a keep-alive stream."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (h.partition(b": ") for h in lines[1:]) if k.lower() == b"content-length")
        out.append((int(lines[0].split()[1]), rest[:length].decode()))
        raw = rest[length:]
    return out


async def test_pipelined_requests_mix_the_fast_path_and_aiohttp_in_order(server: int) -> None:
    raw, closed = await talk(server, [
        b"GET /boot?mac=52%3A54%3A00%3A00%3A00%3A01&exclude=n2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /boot?mac=bad HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /boot?mac=again HTTP/1.1\r\nHost: a\r\n\r\n"])  # after a hand-over aiohttp serves it
    assert not closed
    assert bodies(raw) == [(200, "#!ipxe\necho 52:54:00:00:00:01 n2\n"), (400, "invalid MAC address\n"),
                           (200, "healthy\n"), (200, "from aiohttp\n")]


async def test_fast_answers_carry_aiohttp_style_headers(server: int) -> None:
    raw, closed = await talk(server, [b"GET /boot?mac=x HTTP/1.1\r\nHost: a\r\n\r\n"])
    head = raw.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 200 OK" and not closed
    names = {h.split(b":")[0].lower() for h in head[1:]}
    assert {b"content-type", b"content-length", b"date", b"server"} <= names
    assert b"Content-Type: text/plain; charset=utf-8" in head


async def test_a_request_split_byte_by_byte_is_answered(server: int) -> None:
    request = b"GET /boot?mac=x HTTP/1.1\r\nHost: a\r\n\r\n"
    raw, _ = await talk(server, [request[i:i + 1] for i in range(len(request))])
    assert bodies(raw) == [(200, "#!ipxe\necho x \n")]


@pytest.mark.parametrize(("request_bytes", "keeps_open"), [
    (b"GET /boot?mac=x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
    (b"GET /boot?mac=x HTTP/1.0\r\n\r\n", False),
    (b"GET /boot?mac=x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
])
async def test_keep_alive_follows_the_request(server: int, request_bytes: bytes, keeps_open: bool) -> None:
    raw, closed = await talk(server, [request_bytes + b"GET /boot?mac=y HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert closed is not keeps_open
    assert len(bodies(raw)) == (2 if keeps_open else 1)
    assert (b"Connection: keep-alive" in raw) is keeps_open


@pytest.mark.parametrize("garbage", [
    b"GARBAGE\r\n\r\n",
    b"GET /boot?mac=x HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET /boot?mac=x HTTP/1.1\r\n\r\n",  # no Host
    b"GET /boot?mac=x HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    b"GET /boot?mac=" + b"a" * (MAX_HEAD_BYTES + 10) + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200)),  # a TLS hello
])
async def test_malformed_input_gets_one_error_and_a_close_and_the_server_keeps_serving(
        server: int, garbage: bytes) -> None:
    raw, closed = await talk(server, [garbage])
    assert closed
    assert raw.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")) and raw.count(b"HTTP/1.") == 1
    raw, _ = await talk(server, [b"GET /boot?mac=x HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert bodies(raw) == [(200, "#!ipxe\necho x \n")]


async def test_a_bug_in_the_login_is_a_500_and_a_close(server: int) -> None:
    raw, closed = await talk(server, [b"GET /boot?mac=boom HTTP/1.1\r\nHost: a\r\n\r\n"
                                      b"GET /boot?mac=x HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert closed and bodies(raw) == [(500, "500 Internal Server Error\n")]
    raw, _ = await talk(server, [b"GET /boot?mac=x HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert bodies(raw) == [(200, "#!ipxe\necho x \n")]


async def test_head_goes_to_aiohttp(server: int) -> None:
    raw, _ = await talk(server, [b"HEAD /boot?mac=x HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 13" in raw and raw.endswith(b"\r\n\r\n")
