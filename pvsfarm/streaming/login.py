"""The login service: MAC → device → vDisk → assigned server → export token.

Used by the HTTP login API (`/boot`, `/boot.json`) and by anything else that
logs a target in. Answers from the in-memory inventory only; the session it
opens is journaled and flushed to the database in batches.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pvsfarm.addr import MacAddress
from pvsfarm.errors import NoServerAvailable, PvsfarmError
from pvsfarm.streaming.assign import assign, live_servers
from pvsfarm.streaming.journal import Journal
from pvsfarm.streaming.tokens import ExportGrant, sign, verify
from pvsfarm.views import BootstrapMode, BootstrapView, CacheType, DeviceView, Inventory, ServerView, VDiskMode, VDiskView


_FarmCache = tuple[tuple[ServerView, ...], BootstrapView, float, float, tuple[ServerView, ...]]
"""(servers, bootstrap, valid from, valid until, farm): see `LoginService._farm`."""


class LoginRefused(PvsfarmError):
    """The device may not boot (unknown, disabled, no vDisk). ``reason`` is shown to the target."""


@dataclass(frozen=True, slots=True)
class LoginDecision:
    device: DeviceView
    vdisk: VDiskView
    server: ServerView
    grant: ExportGrant
    token: str
    farm: tuple[ServerView, ...]
    resumed: bool
    cache_lost: bool
    """True when a resumed session moved to a server that cannot see its write cache."""


@dataclass
class LoginService:
    inventory: Inventory
    secret: Callable[[], bytes]
    journal: Journal
    dead_after_s: float
    token_ttl_s: float = 86400.0
    shared_store: bool = False
    current: dict[str, tuple[str, str]] = field(default_factory=dict)
    """mac → (session id, server) of the device's session opened here."""
    recent: dict[str, int] = field(default_factory=dict)
    """Assignments made here that the inventory's loads do not show yet (assign's extra_load)."""
    unflushed: list[str] = field(default_factory=list)
    """The server of each of those assignments, oldest first."""
    lost: dict[str, float] = field(default_factory=dict)
    """server → when a target failing over from it (a valid token naming it, and it in
    ``exclude``) reported it unreachable here."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # the flush thread calls `refreshed` while the loop logs in
        self._farm_cache: _FarmCache | None = None

    def flush_mark(self) -> int:
        """Call just before the journal is taken for a flush; hand the mark to `refreshed`."""
        with self._lock:
            return len(self.unflushed)

    def refreshed(self, flushed: int | None = None) -> None:
        """Call after the inventory's loads were re-read from the database. Only the assignments
        before ``flushed`` (a `flush_mark`; None = all) are in those loads: the ones made while
        the flush ran still count, or a login burst piles onto one server (boot storm)."""
        with self._lock:
            del self.unflushed[:len(self.unflushed) if flushed is None else flushed]
            self.recent = dict(Counter(self.unflushed))

    def _count(self, server: str) -> None:
        with self._lock:
            self.unflushed.append(server)
            self.recent[server] = self.recent.get(server, 0) + 1

    def _device(self, mac: MacAddress) -> tuple[DeviceView, VDiskView]:
        device = self.inventory.device_by_mac(mac)
        if device is None:
            raise LoginRefused(f"unknown device {mac}")
        if not device.enabled:
            raise LoginRefused(f"device {device.name} is disabled")
        vdisk = self.inventory.vdisk(device.vdisk) if device.vdisk else None
        if vdisk is None:
            raise LoginRefused(f"device {device.name} has no vDisk assigned")
        return device, vdisk

    def login(self, mac: MacAddress, now: float, *, resume: str | None = None,
              exclude: frozenset[str] = frozenset()) -> LoginDecision:
        """A new boot (``resume`` None) or a failover of an existing session (``resume`` = its token)."""
        device, vdisk = self._device(mac)
        key = str(mac)
        previous = self._resumable(resume, device, vdisk, now)
        if previous is not None and previous.server in exclude:
            self.lost[previous.server] = now
        sticky = previous.server if previous else self.current.get(key, ("", None))[1]
        lost = self._lost(now)
        server = assign(vdisk, self.inventory.servers(), self.inventory.copies(vdisk.name),
                        self.inventory.bootstrap(), now, self.dead_after_s, current=sticky,
                        exclude=exclude | lost if lost else exclude, extra_load=self.recent)
        if previous is not None:
            grant = ExportGrant(previous.session_id, key, vdisk.name, server.name, int(now))
            if server.name != previous.server:
                # The old server may have died before flushing the session's open: open it here
                # too (a session the database has already is not inserted again), then move it.
                self.journal.open(grant.session_id, key, vdisk.name, server.name, float(previous.issued_at))
                self.journal.move(grant.session_id, server.name)
                # A dead node's targets fail over within a second: count the moves too, or
                # they all pile onto the least-loaded survivor until the next refresh.
                self._count(server.name)
        else:
            grant = ExportGrant(secrets.token_hex(16), key, vdisk.name, server.name, int(now))
            old = self.current.get(key)
            if old is not None:
                self.journal.end(old[0], now)
            self.journal.open(grant.session_id, key, vdisk.name, server.name, now)
            self._count(server.name)
        self.current[key] = (grant.session_id, server.name)
        return LoginDecision(device, vdisk, server, grant, sign(grant, self.secret()), self._farm(now),
                             resumed=previous is not None, cache_lost=self._cache_lost(previous, server, vdisk))

    def _lost(self, now: float) -> frozenset[str]:
        """Servers reported lost by failing-over targets, until they heartbeat again after the
        report (a live one does within a heartbeat or two) or ``dead_after_s`` passes (rule 2
        then applies anyway; also bounds the harm of clock skew or a lying target). Without
        this, a killed node whose targets all moved away is the least loaded server, and every
        new boot is sent to it until its heartbeat ages out (chaos farm: 4 s of boots)."""
        if not self.lost:
            return frozenset()
        beats = {s.name: s.heartbeat_at or 0.0 for s in self.inventory.servers()}
        self.lost = {name: at for name, at in self.lost.items()
                     if now - at <= self.dead_after_s and beats.get(name, 0.0) <= at}
        return frozenset(self.lost)

    def _resumable(self, token: str | None, device: DeviceView, vdisk: VDiskView, now: float) -> ExportGrant | None:
        if not token:
            return None
        try:
            grant = verify(token, self.secret(), now, self.token_ttl_s)
        except PvsfarmError:
            return None
        if grant.mac != str(device.mac) or grant.vdisk != vdisk.name:
            return None
        return grant

    def _cache_lost(self, previous: ExportGrant | None, server: ServerView, vdisk: VDiskView) -> bool:
        if previous is None or previous.server == server.name:
            return False
        keeps_cache_on_server = vdisk.mode is VDiskMode.STANDARD and vdisk.cache_type is CacheType.SERVER
        return keeps_cache_on_server and not self.shared_store

    def _farm(self, now: float) -> tuple[ServerView, ...]:
        """The live farm in bootstrap order. Cached per servers tuple while ``now`` stays in the span
        over which no server's liveness can change (it is built for every login: 8 of 22 us)."""
        servers, boot = self.inventory.servers(), self.inventory.bootstrap()
        cached = self._farm_cache
        if cached is not None and cached[0] is servers and cached[1] is boot and cached[2] <= now <= cached[3]:
            return cached[4]
        live = live_servers(servers, now, self.dead_after_s)
        if boot.mode is BootstrapMode.LISTED:
            order = {name: i for i, name in enumerate(boot.servers)}
            farm = tuple(sorted((s for s in live if s.name in order), key=lambda s: order[s.name]))
        else:
            farm = tuple(live)
        # is_live holds while now - heartbeat_at <= dead_after_s: the first live server to age out
        # bounds the span; a dead server stays dead as ``now`` grows (and state/health are per tuple).
        until = min((s.heartbeat_at + self.dead_after_s for s in live if s.heartbeat_at is not None), default=now)
        self._farm_cache = (servers, boot, now, until, farm)
        return farm


__all__ = ["LoginService", "LoginDecision", "LoginRefused", "NoServerAvailable"]
