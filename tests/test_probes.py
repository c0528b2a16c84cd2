"""The self-check probes against real listeners on loopback, and the fault endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from pvsfarm.bootstrap.tftp.server import TftpSettings, start_tftp_server
from pvsfarm.addr import is_loopback
from pvsfarm.faults import FaultSwitch
from pvsfarm.health import ProbeResult
from pvsfarm.probes import HealthMonitor, QuietProbes, connect_host, probe_http, probe_nbd, probe_tftp
from pvsfarm.streaming.nbd import DictResolver, start_nbd_server
from tests.nodes import free_port

BOOT = b"#!ipxe\nchain http://127.0.0.1/bootstrap.ipxe\n"


async def test_tftp_probe_passes_then_times_out_when_the_server_drops(tmp_path: Path) -> None:
    server = await start_tftp_server(TftpSettings(root=tmp_path, host="127.0.0.1", port=0),
                                     lambda name, _peer: BOOT if name == "boot.ipxe" else None)
    try:
        quiet = QuietProbes()
        assert await probe_tftp("127.0.0.1", server.port, 0.5, quiet=quiet) == ProbeResult("tftp", True)
        assert len(quiet.peers) == 1
        await asyncio.sleep(0.05)
        assert server.active_transfers == 0  # our ERROR ended the transfer: no slot held
        server.dropping = True
        assert await probe_tftp("127.0.0.1", server.port, 0.2) == ProbeResult("tftp", False, "timeout")
        server.dropping = False
        assert (await probe_tftp("127.0.0.1", server.port, 0.5)).ok
        missing = await probe_tftp("127.0.0.1", server.port, 0.5, filename="nope.ipxe")
        assert not missing.ok and missing.detail.startswith("error 1")
    finally:
        server.close()


async def test_tftp_probe_on_a_closed_port_fails() -> None:
    result = await probe_tftp("127.0.0.1", free_port(), 0.2)
    assert not result.ok and result.detail in ("connection refused", "timeout")


def test_quiet_filter_drops_only_probe_lines() -> None:
    quiet = QuietProbes()
    quiet.peers.append(("127.0.0.1", 4000))

    def record(*args: object) -> logging.LogRecord:
        return logging.LogRecord("t", logging.INFO, __file__, 1, "tftp: sent %r to %s", args, None)

    assert not quiet.filter(record("boot.ipxe", ("127.0.0.1", 4000)))
    assert quiet.filter(record("boot.ipxe", ("10.0.0.9", 4000)))


async def _http(handler_status: int) -> web.AppRunner:
    async def health(_request: web.Request) -> web.Response:
        return web.json_response({}, status=handler_status)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


@pytest.mark.parametrize("status", [200, 500])
async def test_http_probe(status: int) -> None:
    runner, port = await _http(status), free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        result = await probe_http("127.0.0.1", port, 0.5)
        assert result == (ProbeResult("http", True) if status == 200 else ProbeResult("http", False, "status 500"))
    finally:
        await runner.cleanup()
    assert await probe_http("127.0.0.1", port, 0.5) == ProbeResult("http", False, "connection refused")


async def test_nbd_probe_reads_the_greeting() -> None:
    server = await start_nbd_server(DictResolver({}), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await probe_nbd("127.0.0.1", port, 0.5) == ProbeResult("nbd", True)
    finally:
        server.close()
        await server.wait_closed()
    assert await probe_nbd("127.0.0.1", port, 0.5) == ProbeResult("nbd", False, "connection refused")


async def test_nbd_probe_times_out_on_a_silent_listener() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    try:
        result = await probe_nbd("127.0.0.1", server.sockets[0].getsockname()[1], 0.2)
        assert result == ProbeResult("nbd", False, "timeout")
    finally:
        server.close()


async def test_monitor_reports_changes_once() -> None:
    answers = iter([False, False, False, True, True, True])
    changes: list[tuple[str, str]] = []

    async def probe() -> ProbeResult:
        return ProbeResult("tftp", next(answers), "timeout")

    monitor = HealthMonitor([probe], on_change=lambda old, new: changes.append((old.summary(), new.summary())))
    for _ in range(6):
        await monitor.check_once()
    assert changes == [("ok", "tftp down: timeout"), ("tftp down: timeout", "ok")]


def test_connect_host() -> None:
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("::") == "::1"
    assert connect_host("10.1.2.3") == "10.1.2.3"


@pytest.mark.parametrize(("addr", "loop"), [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                            ("::ffff:127.0.0.1", True), ("10.0.0.1", False), (None, False),
                                            ("garbage", False)])
def test_is_loopback(addr: str | None, loop: bool) -> None:
    assert is_loopback(addr) is loop


def _request(peer: str, body: object) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (peer, 5555) if key == "peername" else default
    payload = json.dumps(body).encode()
    request = make_mocked_request("POST", "/admin/fault", transport=transport)
    request.read = mock.AsyncMock(return_value=payload)  # type: ignore[method-assign]
    return request


async def test_fault_switch_refuses_and_switches() -> None:
    calls: list[bool] = []
    on, off = FaultSwitch(True, {"tftp": calls.append}), FaultSwitch(False, {"tftp": calls.append})
    down = {"service": "tftp", "state": "down"}
    assert (await on.handle(_request("10.0.0.7", down))).status == 403
    assert (await off.handle(_request("127.0.0.1", down))).status == 403
    assert calls == []
    for bad in ({"service": "dns", "state": "down"}, {"service": "tftp", "state": "sideways"}, [1], "x"):
        assert (await on.handle(_request("127.0.0.1", bad))).status == 400
    assert (await on.handle(_request("127.0.0.1", down))).status == 200
    assert (await on.handle(_request("::1", {"service": "tftp", "state": "up"}))).status == 200
    assert calls == [True, False]
