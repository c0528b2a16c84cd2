"""The target's login: read the server list out of the bootstrap script and ask each
server's ``/boot.json`` in order, as the script's ``chain --timeout`` lines do.

A server that does not answer in time, refuses the connection, or answers 503
(no server available from its view) is skipped; 404 (this MAC may not boot) is
the farm's answer and ends the login at once — every node gives the same one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from pvsfarm.addr import MacAddress
from pvsfarm.target.errors import BootFailed

log = logging.getLogger("pvsfarm.target")
_CHAIN = re.compile(r"^\s*chain\s+(?:--timeout\s+(\d+)\s+)?(https?://[^/\s]+)/boot\?", re.MULTILINE)
DEFAULT_TIMEOUT_S = 3.0
MAX_ANSWER_BYTES = 1 << 20
MAX_SERVERS = 64
"""Servers tried per login (a bootstrap lists a handful; this bounds a hostile script)."""


@dataclass(frozen=True, slots=True)
class LoginUrl:
    base_url: str
    """``http://host:port`` of a server's login API."""
    timeout_s: float


@dataclass(frozen=True, slots=True)
class LoginAnswer:
    server: str
    nbd_host: str
    nbd_port: int
    export: str
    session: str
    vdisk: str
    size_bytes: int
    farm: tuple[tuple[str, str], ...]
    """(name, base URL) of the farm's live servers, from the answer."""
    resumed: bool
    cache_lost: bool


def parse_bootstrap(script: str) -> list[LoginUrl]:
    """The login URLs of a pvsfarm bootstrap script, in order, without repeats."""
    if not script.startswith("#!ipxe"):
        raise BootFailed("tftp", "the bootstrap file is not an iPXE script (no #!ipxe line)")
    urls: list[LoginUrl] = []
    for match in _CHAIN.finditer(script):
        timeout_ms, base = match.groups()
        if base not in {u.base_url for u in urls} and len(urls) < MAX_SERVERS:
            urls.append(LoginUrl(base, int(timeout_ms) / 1000 if timeout_ms else DEFAULT_TIMEOUT_S))
    if not urls:
        raise BootFailed("tftp", "the bootstrap script names no server (no `chain ... /boot?` line)")
    return urls


def answer_from_json(body: dict[str, Any]) -> LoginAnswer:
    try:
        return LoginAnswer(
            server=str(body["server"]), nbd_host=str(body["nbd_host"]), nbd_port=int(body["nbd_port"]),
            export=str(body["export"]), session=str(body["session"]), vdisk=str(body["vdisk"]),
            size_bytes=int(body["size_bytes"]), resumed=bool(body.get("resumed")),
            cache_lost=bool(body.get("cache_lost")),
            farm=tuple((str(s["name"]), str(s["url"])) for s in body.get("farm", ())))
    except (KeyError, TypeError, ValueError) as exc:
        raise BootFailed("login", f"incomplete login answer: {exc!r}") from exc


def login_query(mac: MacAddress, resume: str | None, exclude: Iterable[str]) -> str:
    query = f"mac={quote(str(mac), safe='')}"
    if resume:
        query += f"&resume={quote(resume, safe='')}"
    skip = sorted(set(exclude))
    if skip:
        query += f"&exclude={quote(','.join(skip), safe=',')}"
    return query


async def _ask(http: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[int, Any]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
        if len(raw) > MAX_ANSWER_BYTES:
            raise BootFailed("login", f"{url}: answer larger than {MAX_ANSWER_BYTES} bytes")
        try:
            return resp.status, json.loads(raw)
        except ValueError as exc:
            raise BootFailed("login", f"{url}: answer is not JSON (HTTP {resp.status})") from exc


async def login(urls: Sequence[LoginUrl], mac: MacAddress, *, resume: str | None = None,
                exclude: Iterable[str] = ()) -> tuple[LoginAnswer, str]:
    """The first answer from ``urls`` in order, and the base URL that gave it."""
    query = login_query(mac, resume, exclude)
    failures: list[str] = []
    async with aiohttp.ClientSession() as http:
        for u in urls[:MAX_SERVERS]:
            try:
                status, body = await _ask(http, f"{u.base_url}/boot.json?{query}", u.timeout_s)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures.append(f"{u.base_url}: {type(exc).__name__} {exc}".strip())
                log.info("login: %s did not answer (%s)", u.base_url, type(exc).__name__)
                continue
            error = body.get("error") if isinstance(body, dict) else "not an object"
            if status == 404:
                raise BootFailed("login", f"refused by {u.base_url}: {error}")
            if status != 200:
                failures.append(f"{u.base_url}: HTTP {status} {error}")
                continue
            return answer_from_json(body), u.base_url
    raise BootFailed("login", "no server answered: " + "; ".join(failures))
