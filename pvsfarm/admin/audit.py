"""`pvsfarm audit`: every single point of failure and weak spot, named with its fix.

Pure: `audit(facts)` judges a plain `FarmFacts` (no database, clock or
network; `audit_gather.gather_facts` fills it from the database). Each check
returns `Finding`s; severities:

- ``critical``: one more failure (or none) and targets do not boot, or lose
  what they run on — a single point of failure.
- ``warning``: redundancy is reduced or a boot is slowed, but a peer covers.
- ``advice``: outside what pvsfarm can fix itself (e.g. the database standby:
  pvsfarm does not replicate PostgreSQL, it tells you to run one).

Critical and warning findings are *severe*: the command exits non-zero, so
it can run in monitoring.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from pvsfarm.streaming.assign import is_live
from pvsfarm.views import (
    BootstrapMode,
    BootstrapView,
    CacheType,
    CopyState,
    CopyView,
    DeviceView,
    ServerState,
    ServerView,
    VDiskMode,
    VDiskView,
)


class Severity(enum.Enum):
    CRITICAL = "critical"
    WARNING = "warning"
    ADVICE = "advice"

    @property
    def severe(self) -> bool:
        return self is not Severity.ADVICE


_RANK = {Severity.CRITICAL: 0, Severity.WARNING: 1, Severity.ADVICE: 2}


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    check: str
    """Stable check id (``live-nodes``, ``vdisk-copies``...), for scripts."""
    object: str
    finding: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity.value, "check": self.check, "object": self.object,
                "finding": self.finding, "fix": self.fix}


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """A server row plus what its node reports with each heartbeat (None = not reported)."""

    server: ServerView
    dhcp_subnet: IPv4Network | None = None
    """The subnet its DHCP serves; None = DHCP off on that node."""
    offline_cache_at: float | None = None
    inventory_generation: int | None = None
    store_shared: bool | None = None


@dataclass(frozen=True, slots=True)
class MediaFacts:
    """A boot medium handed out (`pvsfarm bootstrap iso`)."""

    id: int
    kind: str
    bootstrap_version: int
    servers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DatabaseFacts:
    backend: str
    """SQLAlchemy dialect name: ``postgresql`` or ``sqlite``."""
    standby: bool | None
    """A streaming standby is attached (PostgreSQL ``pg_stat_replication``); None = unknown."""


OFFLINE_CACHE_MAX_AGE_S = 60.0
GENERATION_SKEW_S = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    dead_after_s: float = 5.0
    """A heartbeat older than this is a dead node (the nodes' own ``dead_after_s``)."""
    offline_cache_max_age_s: float = OFFLINE_CACHE_MAX_AGE_S
    """Nodes save their offline cache every 10 s (node_offline.SAVE_EVERY_S) and on
    each change; six missed saves is a node that cannot write it."""
    generation_skew_s: float = GENERATION_SKEW_S
    """Nodes re-read the inventory every heartbeat (1 s) or on NOTIFY; one still
    serving an older generation this long after a change is not catching up."""


@dataclass(frozen=True, slots=True)
class FarmFacts:
    now: float
    nodes: tuple[NodeFacts, ...]
    bootstrap: BootstrapView
    vdisks: tuple[VDiskView, ...]
    copies: tuple[CopyView, ...]
    devices: tuple[DeviceView, ...]
    generation: int
    """The inventory generation in the database."""
    generation_changed_at: float | None
    """When the last admin change (which bumps the generation) was made."""
    database: DatabaseFacts
    media: tuple[MediaFacts, ...] = ()
    limits: Limits = field(default_factory=Limits)

    def live(self, node: NodeFacts) -> bool:
        return is_live(node.server, self.now, self.limits.dead_after_s)

    def beating(self, node: NodeFacts) -> bool:
        """Heartbeat fresh (its reported facts are current), whatever its health."""
        s = node.server
        return (s.state is not ServerState.DOWN and s.heartbeat_at is not None
                and self.now - s.heartbeat_at <= self.limits.dead_after_s)

    def used_vdisks(self) -> set[str]:
        return {d.vdisk for d in self.devices if d.enabled and d.vdisk is not None}

    def verified_holders(self, vdisk: VDiskView) -> list[str]:
        return sorted(c.server for c in self.copies if c.serves(vdisk))


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


def check_live_nodes(f: FarmFacts) -> list[Finding]:
    live = [n.server.name for n in f.nodes if f.live(n)]
    if len(live) >= 2:
        return []
    return [Finding(Severity.CRITICAL, "live-nodes", "farm",
                    f"{len(live)} live node(s) of {len(f.nodes)} ({_names(live)}): a target has nowhere to fail over",
                    "run `pvsfarm node` on at least two servers sharing this database")]


def _why_not_usable(f: FarmFacts, node: NodeFacts) -> str | None:
    s = node.server
    if s.state is ServerState.DRAINING:
        return "drained"
    if f.live(node):
        return None
    if s.heartbeat_at is None:
        return "dead (never heartbeated)"
    if s.state is ServerState.DOWN:
        return "dead (stopped)"
    if f.now - s.heartbeat_at > f.limits.dead_after_s:
        return f"dead (no heartbeat for {f.now - s.heartbeat_at:.0f} s)"
    return f"unable to stream ({s.health})"


def check_bootstrap(f: FarmFacts) -> list[Finding]:
    boot, out = f.bootstrap, []
    obj = f"bootstrap v{boot.version}"
    if len(boot.servers) < 2:
        sev = Severity.CRITICAL if boot.mode is BootstrapMode.LISTED else Severity.WARNING
        out.append(Finding(sev, "bootstrap-size", obj, f"names {len(boot.servers)} server(s) ({_names(boot.servers)})",
                           "`pvsfarm bootstrap configure --server A --server B` (two or more)"))
    by_name = {n.server.name: n for n in f.nodes}
    named = [by_name[n] for n in boot.servers if n in by_name]
    why = {n.server.name: _why_not_usable(f, n) for n in named}
    usable = [name for name, reason in why.items() if reason is None]
    sev = Severity.CRITICAL if len(usable) < 2 else Severity.WARNING
    for name, reason in why.items():
        if reason is not None:
            check = "bootstrap-drained" if reason == "drained" else "bootstrap-dead"
            how = f"`pvsfarm server undrain {name}`" if reason == "drained" else f"start {name}'s node"
            out.append(Finding(sev, check, f"server {name}", f"named in {obj} but {reason}",
                               f"{how}, or replace it in the bootstrap"))
    return out + _bootstrap_copies(f, named, obj)


def _bootstrap_copies(f: FarmFacts, named: list[NodeFacts], obj: str) -> list[Finding]:
    used = [v for v in f.vdisks if v.name in f.used_vdisks()]
    out = []
    for node in named:
        lacking = [v.name for v in used if node.server.name not in f.verified_holders(v)]
        if lacking:
            out.append(Finding(Severity.WARNING, "bootstrap-copies", f"server {node.server.name}",
                               f"named in {obj} but holds no verified copy of vDisk(s) {_names(lacking)}",
                               "let its node replicate them (it pulls from live peers) or "
                               "`pvsfarm vdisk copy NAME --server S --path P`"))
    return out


def check_dhcp_redundancy(f: FarmFacts) -> list[Finding]:
    reserved = [d for d in f.devices if d.enabled and d.ipv4 is not None]
    serving = [n for n in f.nodes if n.dhcp_subnet is not None]
    if not reserved:
        return []
    if not serving:
        return [Finding(Severity.ADVICE, "dhcp-redundancy", "dhcp", "no node serves DHCP: targets rely on "
                        "another DHCP server", "make that DHCP server redundant (e.g. Kea HA) with the reservations "
                        "from `pvsfarm device list`, or set dhcp.interface/dhcp.subnet on two or more nodes")]
    answering = [n for n in serving if f.live(n) and n.server.health == "ok"]
    by_collection: dict[str, list[DeviceView]] = {}
    for d in reserved:
        by_collection.setdefault(d.collection, []).append(d)
    out = []
    for coll, devices in sorted(by_collection.items()):
        worst, example = min(((sum(1 for n in answering if d.ipv4 in n.dhcp_subnet), d.name) for d in devices))
        if worst < 2:
            nodes = [n.server.name for n in answering if any(d.ipv4 in n.dhcp_subnet for d in devices)]
            out.append(Finding(Severity.CRITICAL, "dhcp-redundancy", f"collection {coll}",
                               f"DHCP for its reservations is answered by {worst} live, healthy node(s) "
                               f"(e.g. device {example}; nodes serving any of them: {_names(nodes)})",
                               "serve the collection's subnet from a second node (dhcp.interface and "
                               "dhcp.subnet in its config)"))
    return out


def check_reservations_agree(f: FarmFacts) -> list[Finding]:
    settled = f.generation_changed_at is None or f.now - f.generation_changed_at > f.limits.generation_skew_s
    out = []
    for n in f.nodes:
        if n.dhcp_subnet is None or not f.beating(n):
            continue
        gen = n.inventory_generation
        if gen is None:
            out.append(Finding(Severity.WARNING, "dhcp-reservations", f"server {n.server.name}",
                               "does not report which inventory generation its DHCP serves",
                               "upgrade pvsfarm on that node"))
        elif gen != f.generation and settled:
            out.append(Finding(Severity.WARNING, "dhcp-reservations", f"server {n.server.name}",
                               f"serves reservations from generation {gen}, the farm is at {f.generation}: "
                               "its DHCP answers differ from its peers'",
                               "check that node's log for inventory refresh errors; restart it"))
    return out


def check_health_with_dhcp(f: FarmFacts) -> list[Finding]:
    return [
        Finding(Severity.CRITICAL, "health-dhcp", f"server {n.server.name}",
                f"its health check fails ({n.server.health}) while it is set to answer DHCP for {n.dhcp_subnet}",
                "repair the failing service (node log, /health); pvsfarm's DHCP stays silent while unhealthy, "
                f"so make sure another node serves {n.dhcp_subnet}")
        for n in f.nodes
        if n.dhcp_subnet is not None and f.beating(n) and n.server.health not in ("ok", "")
    ]


def check_vdisk_copies(f: FarmFacts) -> list[Finding]:
    used, out = f.used_vdisks(), []
    for v in f.vdisks:
        holders = f.verified_holders(v)
        if len(holders) < 2:
            sev = Severity.CRITICAL if v.name in used else Severity.WARNING
            out.append(Finding(sev, "vdisk-copies", f"vdisk {v.name}",
                               f"{len(holders)} verified copy(ies) ({_names(holders)})",
                               "start a second node (it replicates verified copies from live peers) or "
                               f"`pvsfarm vdisk copy {v.name} --server S --path P`"))
    stale = [c for c in f.copies if c.state is CopyState.STALE]
    for c in sorted(stale, key=lambda c: (c.vdisk, c.server)):
        out.append(Finding(Severity.WARNING, "vdisk-stale", f"vdisk {c.vdisk} on {c.server}",
                           "stale copy: not served until it is re-synced",
                           "the node re-syncs it from a verified peer; if it stays stale, read its log "
                           f"or re-copy it (`pvsfarm vdisk copy {c.vdisk} --server {c.server} --path P`)"))
    return out


def check_offline_cache(f: FarmFacts) -> list[Finding]:
    out, bound = [], f.limits.offline_cache_max_age_s
    for n in f.nodes:
        if not f.beating(n):
            continue
        if n.offline_cache_at is None:
            what = "has no offline cache"
        elif f.now - n.offline_cache_at > bound:
            what = f"saved its offline cache {f.now - n.offline_cache_at:.0f} s ago (bound {bound:.0f} s)"
        else:
            continue
        out.append(Finding(Severity.WARNING, "offline-cache", f"server {n.server.name}",
                           f"{what}: it cannot keep booting targets while the database is down",
                           "check the node can write its offline_cache file (disk space, permissions)"))
    return out


def check_database(f: FarmFacts) -> list[Finding]:
    db = f.database
    if db.standby:
        return []
    if db.backend == "sqlite":
        what, fix = ("embedded SQLite: one file on one machine, no standby",
                     "move the farm to PostgreSQL (database_url) with a streaming-replication standby")
    elif db.standby is None:
        what, fix = ("could not tell whether PostgreSQL has a standby (pg_stat_replication unreadable)",
                     "check the primary has a streaming-replication standby")
    else:
        what, fix = ("PostgreSQL has no standby (pg_stat_replication is empty); nodes' offline caches only "
                     "keep boots going", "run a streaming-replication standby and a failover manager "
                     "(pvsfarm does not replicate PostgreSQL itself)")
    return [Finding(Severity.ADVICE, "db-standby", "database", what, fix)]


def check_write_cache(f: FarmFacts) -> list[Finding]:
    used, out = f.used_vdisks(), []
    shared = {n.server.name: n.store_shared for n in f.nodes}
    for v in f.vdisks:
        if v.name not in used or v.mode is not VDiskMode.STANDARD or v.cache_type is not CacheType.SERVER:
            continue
        holders = f.verified_holders(v)
        local = [s for s in holders if shared.get(s) is False]
        if len(holders) >= 2 and local:
            out.append(Finding(Severity.WARNING, "write-cache-local", f"vdisk {v.name}",
                               f"server write cache on the local store of {_names(local)}: a target that fails "
                               "over loses its writes", "share the store (store.shared: true on every node) or "
                               "move the vDisk to device-ram cache"))
    return out


def check_issued_media(f: FarmFacts) -> list[Finding]:
    known, out = {n.server.name for n in f.nodes}, []
    for m in f.media:
        gone = [s for s in m.servers if s not in known]
        if gone:
            sev = Severity.CRITICAL if len(gone) == len(m.servers) else Severity.WARNING
            out.append(Finding(sev, "issued-media", f"{m.kind} #{m.id}",
                               f"issued from bootstrap v{m.bootstrap_version}, lists server(s) no longer in the "
                               f"farm: {_names(gone)}", "build a new one (`pvsfarm bootstrap iso`) and replace it "
                               "on the targets"))
    return out


CHECKS: tuple[Callable[[FarmFacts], list[Finding]], ...] = (
    check_live_nodes, check_bootstrap, check_dhcp_redundancy, check_reservations_agree, check_health_with_dhcp,
    check_vdisk_copies, check_offline_cache, check_database, check_write_cache, check_issued_media,
)


def audit(facts: FarmFacts) -> list[Finding]:
    """Every finding, most severe first."""
    findings = [finding for check in CHECKS for finding in check(facts)]
    return sorted(findings, key=lambda x: (_RANK[x.severity], x.check, x.object))


def is_severe(findings: Iterable[Finding]) -> bool:
    return any(x.severity.severe for x in findings)
