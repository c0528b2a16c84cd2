"""The HTTP side of a node (aiohttp): bootstrap, login API, vDisk range reads.

- ``GET /bootstrap.ipxe``: the farm's bootstrap script (same on every node).
- ``GET /boot?mac=``: the login answer as an iPXE script (sanboot or kernel).
- ``GET /boot.json?mac=[&resume=TOKEN][&exclude=a,b]``: the same decision as
  JSON, for OS-stage agents and simulated targets (failover uses ``resume``).
- ``HEAD|GET /vdisk/{token}``: the export over HTTP for iPXE ``sanboot``
  (``Accept-Ranges: bytes`` on HEAD; one range per request → 206).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.ipxe import Endpoint, bootstrap_script, kernel_script, retry_script, sanboot_script
from pvsfarm.errors import InvalidInput, NoServerAvailable
from pvsfarm.store import read_bytes
from pvsfarm.streaming.exports import Exports
from pvsfarm.streaming.login import LoginDecision, LoginRefused, LoginService
from pvsfarm.views import BootMethod, BootstrapMode, Inventory, ServerView

MAX_RANGE_BYTES = 32 * 1024 * 1024
"""Largest single range answered (as the NBD request cap)."""
STREAM_CHUNK_BYTES = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_mac(raw: str | None) -> MacAddress:
    """The ``mac`` query value (already percent-decoded once; iPXE may encode twice)."""
    if raw is None:
        raise InvalidInput("missing mac parameter")
    return MacAddress.parse(unquote(raw))


def base_url(server: ServerView) -> str:
    return f"http://{server.address}:{server.http_port}"


@dataclass
class HttpApi:
    inventory: Inventory
    login: LoginService
    exports: Exports
    node: str
    self_url: str
    clock: Callable[[], float] = time.time

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/bootstrap.ipxe", self.bootstrap)
        app.router.add_get("/boot", self.boot)
        app.router.add_get("/boot.json", self.boot_json)
        app.router.add_get("/vdisk/{token}", self.vdisk)

    def bootstrap_text(self) -> str:
        boot = self.inventory.bootstrap()
        by_name = {s.name: s for s in self.inventory.servers()}
        names = list(boot.servers) or [self.node]
        if boot.mode is BootstrapMode.LIVE:
            names += sorted(n for n in by_name if n not in names)
        endpoints = [Endpoint(n, base_url(by_name[n])) for n in names if n in by_name]
        return bootstrap_script(endpoints, boot.timeout_ms, boot.version, live=boot.mode is BootstrapMode.LIVE)

    async def bootstrap(self, _request: web.Request) -> web.Response:
        return web.Response(text=self.bootstrap_text(), content_type="text/plain")

    def _mac(self, request: web.Request) -> MacAddress:
        try:
            return parse_mac(request.query.get("mac"))
        except InvalidInput as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from exc

    def _decide(self, request: web.Request, *, json_api: bool) -> LoginDecision:
        mac = self._mac(request)
        exclude = frozenset(x for x in request.query.get("exclude", "").split(",") if x)
        return self.login.login(mac, self.clock(), resume=request.query.get("resume") if json_api else None,
                                exclude=exclude)

    def _retry_urls(self) -> list[str]:
        """The bootstrap's other servers first, this node last."""
        boot = self.inventory.bootstrap()
        by_name = {s.name: s for s in self.inventory.servers()}
        others = [base_url(by_name[n]) for n in boot.servers if n in by_name and n != self.node]
        return [u for u in others if u != self.self_url] + [self.self_url]

    async def boot(self, request: web.Request) -> web.Response:
        status, text = self.boot_answer(request.query.get("mac"), request.query.get("exclude", ""))
        if status != 200:
            raise web.HTTPBadRequest(text=text)
        return web.Response(text=text, content_type="text/plain")

    def boot_answer(self, raw_mac: str | None, raw_exclude: str = "") -> tuple[int, str]:
        """``GET /boot`` as (status, iPXE script or error text), from the decoded query values;
        shared by the aiohttp route and the fast path (`http_fast`)."""
        try:
            mac = parse_mac(raw_mac)
        except InvalidInput as exc:
            return 400, f"{exc}\n"
        exclude = frozenset(x for x in raw_exclude.split(",") if x)
        try:
            decision = self.login.login(mac, self.clock(), exclude=exclude)
        except (LoginRefused, NoServerAvailable) as exc:
            return 200, retry_script(str(exc), self._retry_urls())
        url = base_url(decision.server)
        if decision.vdisk.boot_method is BootMethod.KERNEL:
            nbd = f"{decision.server.address}:{decision.server.nbd_port}"
            return 200, kernel_script(decision.server.name, url, decision.token, decision.vdisk.name, nbd, "")
        return 200, sanboot_script(decision.server.name, url, decision.token, decision.vdisk.name)

    async def boot_json(self, request: web.Request) -> web.Response:
        try:
            d = self._decide(request, json_api=True)
        except LoginRefused as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except NoServerAvailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        return web.json_response({
            "device": d.device.name, "mac": str(d.device.mac), "vdisk": d.vdisk.name,
            "size_bytes": d.vdisk.size_bytes, "mode": d.vdisk.mode.value, "cache_type": d.vdisk.cache_type.value,
            "server": d.server.name, "nbd_host": d.server.address, "nbd_port": d.server.nbd_port,
            "http_url": base_url(d.server), "export": d.token, "session": d.grant.session_id,
            "resumed": d.resumed, "cache_lost": d.cache_lost,
            "farm": [{"name": s.name, "url": base_url(s)} for s in d.farm],
        })

    async def vdisk(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        opened = self.exports.open_export(request.match_info["token"], (peer or ("", 0))[:2])
        if opened is None:
            raise web.HTTPNotFound(text="unknown export\n")
        try:
            response = await self._serve_range(request, opened.device)
            if opened.on_io is not None and request.method == "GET":
                opened.on_io(response.content_length or 0, 0)  # sanboot reads count as session I/O
            return response
        finally:
            opened.device.close()
            if opened.on_close:
                opened.on_close()

    async def _serve_range(self, request: web.Request, device) -> web.StreamResponse:  # type: ignore[no-untyped-def]
        size = device.size_bytes
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        header = request.headers.get("Range")
        if header is None:
            start, end, status = 0, size - 1, 200
        else:
            start, end = self._parse_range(header, size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        if length <= STREAM_CHUNK_BYTES:
            return web.Response(status=status, headers=headers, body=read_bytes(device, start, length))
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        offset = start
        while offset <= end:
            n = min(STREAM_CHUNK_BYTES, end + 1 - offset)
            await response.write(read_bytes(device, offset, n))
            offset += n
        await response.write_eof()
        return response

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int, int]:
        unsatisfiable = web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
        match = _RANGE.match(header.strip())
        if match is None:
            raise unsatisfiable  # several ranges or another unit: we serve one byte range only
        first, last = match.groups()
        if first == "" and last == "":
            raise unsatisfiable
        if first == "":
            start, end = max(0, size - int(last)), size - 1
        else:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        if start >= size or end < start or end - start + 1 > MAX_RANGE_BYTES:
            raise unsatisfiable
        return start, end
