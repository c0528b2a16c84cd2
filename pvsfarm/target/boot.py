"""The simulated target's boot, step by step and timed:

1. ``dhcp``: DISCOVER/OFFER/REQUEST/ACK as iPXE (the lease is put on the interface);
2. ``tftp``: the bootstrap script named in the ACK, from the TFTP server named there;
3. ``login``: the first server of the script that answers ``/boot.json``;
4. ``nbd_connect`` + ``nbd_read``: NBD_OPT_GO for the export token, sequential reads
   hashed with SHA-256, compared with the expected digest when one is given.

Failover: when the NBD link fails (reset, closed, timeout), the target logs in
again through the farm's other servers with ``resume=<token>&exclude=<dead>``,
sleeping a full-jitter exponential back-off before each attempt (AWS
Architecture Blog, "Exponential Backoff And Jitter": no thundering herd when a
node's hundreds of targets lose it at once), reconnects and retries the
in-flight read. Reads of a read-only base are idempotent, so a retry is safe.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from pvsfarm.addr import MacAddress
from pvsfarm.target.dhcp import configure_address, obtain_lease
from pvsfarm.target.errors import BootFailed, StreamLost
from pvsfarm.target.login import LoginAnswer, LoginUrl, login, parse_bootstrap
from pvsfarm.target.nbd import NbdClient
from pvsfarm.target.tftp import tftp_get

log = logging.getLogger("pvsfarm.target")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TargetSettings:
    mac: MacAddress
    iface: str
    reads: int | None = None
    """Reads to make; None = the whole vDisk."""
    read_bytes: int = 256 * 1024
    verify_sha256: str | None = None
    """Expected hex SHA-256 of what is read."""
    configure_address: bool = True
    """Put the leased address on ``iface`` (``ip addr replace``)."""
    dhcp_timeout_s: float = 1.0
    """First DHCP wait; try n waits n times as long."""
    dhcp_tries: int = 3
    login_timeout_s: float | None = None
    """Per-server login timeout; None = the bootstrap's ``chain --timeout``."""
    read_timeout_s: float = 5.0
    """An NBD read (or write) slower than this counts as a dead link."""
    read_delay_s: float = 0.0
    """Pause between reads (an OS doing work between reads)."""
    failover_attempts: int = 8
    """Login+connect attempts per failover."""
    max_failovers: int = 4
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Failover:
    from_server: str
    to_server: str
    offset: int
    """Offset of the in-flight read (or write) that was retried."""
    attempts: int
    seconds: float
    """From the start of the failed read to the end of its successful retry."""
    resumed: bool
    cache_lost: bool
    reason: str


@dataclass
class BootReport:
    mac: str
    iface: str
    address: str | None = None
    dhcp_server: str | None = None
    tftp_server: str | None = None
    boot_file: str | None = None
    bootstrap_servers: list[str] = field(default_factory=list)
    login_url: str | None = None
    first_server: str | None = None
    server: str | None = None
    """The server streaming at the end (differs from ``first_server`` after a failover)."""
    vdisk: str | None = None
    size_bytes: int | None = None
    bytes_read: int = 0
    reads: int = 0
    sha256: str | None = None
    verified: bool | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _timed(report: BootReport, step: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        report.timings_s[step] = round(time.monotonic() - start, 4)


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return (rng or random).uniform(0.0, min(cap_s, base_s * (2 ** min(attempt, 30))))


@dataclass
class Stream:
    """The target's attachment to the farm: the login answer and its NBD connection."""

    settings: TargetSettings
    urls: list[LoginUrl]
    answer: LoginAnswer
    report: BootReport
    client: NbdClient | None = None
    dead: set[str] = field(default_factory=set)
    on_login: Callable[[LoginAnswer, str], None] | None = None
    """Called with each failover's login answer and the base URL that gave it
    (`stream_from_login` also calls it with the first)."""

    async def connect(self) -> NbdClient:
        a = self.answer
        self.client = await NbdClient.connect(a.nbd_host, a.nbd_port, a.export,
                                              timeout_s=self.settings.read_timeout_s)
        log.info("nbd: connected to %s (%s:%d), export %d bytes", a.server, a.nbd_host, a.nbd_port,
                 self.client.size_bytes)
        return self.client

    async def read(self, offset: int, length: int) -> bytes:
        """Read, failing over (bounded) when the link dies; the failed read is retried."""
        timeout = self.settings.read_timeout_s
        return await self._retrying(offset, lambda c: c.read(offset, length, timeout_s=timeout))

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Write (acknowledged on return), failing over as `read` does. A write whose reply
        was lost is sent again to the new server: the same bytes at the same place."""
        timeout = self.settings.read_timeout_s
        await self._retrying(offset, lambda c: c.write(offset, data, fua=fua, timeout_s=timeout))

    async def _retrying(self, offset: int, op: Callable[[NbdClient], Awaitable[T]]) -> T:
        started, lost = time.monotonic(), None
        for _ in range(self.settings.max_failovers + 1):
            try:
                result = await op(self.client or await self.connect())
            except StreamLost as exc:
                lost = lost or (self.answer.server, str(exc), 0)
                attempts = await self.failover(exc)
                lost = (lost[0], lost[1], lost[2] + attempts)
                continue
            if lost is not None:
                self._record(lost, offset, time.monotonic() - started)
            return result
        raise BootFailed("failover", f"I/O at {offset} still failing after {self.settings.max_failovers} failovers")

    def _record(self, lost: tuple[str, str, int], offset: int, seconds: float) -> None:
        a = self.answer
        event = Failover(lost[0], a.server, offset, lost[2], round(seconds, 4), a.resumed, a.cache_lost, lost[1])
        self.report.failovers.append(event)
        log.info("failover: %s -> %s in %.3f s (%d attempts, read at %d retried)", event.from_server,
                 event.to_server, seconds, event.attempts, offset)

    async def failover(self, reason: Exception) -> int:
        """Log in again elsewhere and reconnect; returns the attempts it took."""
        dead = self.answer.server
        self.dead.add(dead)
        log.warning("nbd: link to %s lost (%s); failing over", dead, reason)
        if self.client is not None:
            await self.client.close()
            self.client = None
        s, last = self.settings, reason
        for attempt in range(s.failover_attempts):
            await asyncio.sleep(backoff_s(attempt, s.backoff_base_s, s.backoff_cap_s))
            try:
                self.answer, url = await login(self._candidates(), s.mac, resume=self.answer.export,
                                               exclude=self.dead)
                self.report.login_url = url
                if self.on_login is not None:
                    self.on_login(self.answer, url)
                await self.connect()
                return attempt + 1
            except (BootFailed, StreamLost) as exc:
                last = exc
                log.info("failover: attempt %d/%d failed: %s", attempt + 1, s.failover_attempts, exc)
        raise BootFailed("failover", f"no other server took over after {s.failover_attempts} attempts: {last}")

    def _candidates(self) -> list[LoginUrl]:
        """Live servers of the farm first, then the bootstrap's, then the dead ones (their
        login API may still be up when only streaming failed; ``exclude`` keeps them out)."""
        timeout = self.settings.login_timeout_s or (self.urls[0].timeout_s if self.urls else 3.0)
        farm = [LoginUrl(url, timeout) for name, url in self.answer.farm if name not in self.dead]
        dead = {url for name, url in self.answer.farm if name in self.dead}
        seen = {u.base_url for u in farm}
        listed = [u for u in self.urls if u.base_url not in seen and u.base_url not in dead]
        return farm + listed + [LoginUrl(url, timeout) for url in sorted(dead)]


async def stream_from_login(urls: Sequence[LoginUrl], settings: TargetSettings, *,
                            report: BootReport | None = None,
                            on_login: Callable[[LoginAnswer, str], None] | None = None) -> Stream:
    """The boot from step 3 on: log in through ``urls`` (in order), connect, failing over if
    the assigned server does not take the connection. For targets that already know the farm
    (an OS-stage agent, loopback tests): no DHCP/TFTP. Close ``stream.client`` when done."""
    report = report or BootReport(mac=str(settings.mac), iface=settings.iface)
    urls = list(urls)
    report.bootstrap_servers = [u.base_url for u in urls]
    answer, report.login_url = await login(urls, settings.mac)
    if on_login is not None:
        on_login(answer, report.login_url)
    report.first_server, report.vdisk, report.size_bytes = answer.server, answer.vdisk, answer.size_bytes
    stream = Stream(settings, urls, answer, report, on_login=on_login)
    try:
        await stream.connect()
    except StreamLost as exc:
        await stream.failover(exc)
    return stream


async def boot(settings: TargetSettings) -> BootReport:
    """Boot once; `BootFailed` (with the partial report attached) when a step fails."""
    report = BootReport(mac=str(settings.mac), iface=settings.iface)
    try:
        with _timed(report, "total"):
            await _boot(settings, report)
    except BootFailed as exc:
        exc.report = report.to_dict()
        raise
    return report


async def _boot(s: TargetSettings, report: BootReport) -> None:
    with _timed(report, "dhcp"):
        lease = await obtain_lease(s.iface, s.mac, timeout_s=s.dhcp_timeout_s, tries=s.dhcp_tries)
        if s.configure_address:
            await configure_address(s.iface, lease)
    report.address, report.dhcp_server = f"{lease.address}/{lease.prefix_len}", str(lease.server_id)
    report.tftp_server, report.boot_file = str(lease.tftp_server), lease.boot_file
    log.info("dhcp: %s from %s, boot file %s on %s", report.address, lease.server_id, lease.boot_file,
             lease.tftp_server)
    with _timed(report, "tftp"):
        script = await tftp_get(lease.tftp_server, lease.boot_file)
    urls = parse_bootstrap(script.decode("utf-8", "replace"))
    if s.login_timeout_s is not None:
        urls = [LoginUrl(u.base_url, s.login_timeout_s) for u in urls]
    report.bootstrap_servers = [u.base_url for u in urls]
    with _timed(report, "login"):
        answer, report.login_url = await login(urls, s.mac)
    report.first_server, report.vdisk, report.size_bytes = answer.server, answer.vdisk, answer.size_bytes
    log.info("login: %s assigned by %s (vDisk %s)", answer.server, report.login_url, answer.vdisk)
    stream = Stream(s, urls, answer, report)
    with _timed(report, "nbd_connect"):
        try:
            await stream.connect()
        except StreamLost as exc:
            await stream.failover(exc)
    with _timed(report, "nbd_read"):
        await _read_disk(stream, s, report)
    report.server = stream.answer.server
    if stream.client is not None:
        await stream.client.close()


async def _read_disk(stream: Stream, s: TargetSettings, report: BootReport) -> None:
    assert stream.client is not None
    size = stream.client.size_bytes
    total = size if s.reads is None else min(size, s.reads * s.read_bytes)
    digest, offset = hashlib.sha256(), 0
    while offset < total:  # bounded: offset grows by >= 1 byte per pass
        n = min(s.read_bytes, total - offset)
        digest.update(await stream.read(offset, n))
        offset += n
        report.reads += 1
        report.bytes_read = offset
        if s.read_delay_s and offset < total:
            await asyncio.sleep(s.read_delay_s)
    report.sha256 = digest.hexdigest()
    if s.verify_sha256 is not None:
        report.verified = report.sha256 == s.verify_sha256.strip().lower()
    log.info("nbd: read %d bytes from %s, sha256 %s%s", total, stream.answer.server, report.sha256,
             "" if report.verified is None else (" (verified)" if report.verified else " (MISMATCH)"))


def run_target(settings: TargetSettings) -> BootReport:
    """`boot` on a fresh event loop (the CLI's entry point)."""
    return asyncio.run(boot(settings))
