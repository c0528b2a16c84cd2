"""Which server streams a vDisk to a target: the one owner of that decision.

`assign` is pure and deterministic (no clock, no I/O): the same inputs give
the same answer, so firmware that asks twice is sent to the same server.

Rules, in order:
 1. Candidates are the servers named in the bootstrap (``listed`` mode, the
    original product's rule), or every known server (``live`` mode).
 2. A candidate must be ``up`` (not draining, not down), its heartbeat
    must be no older than ``dead_after_s`` at ``now``, and its own health
    check must not report its NBD or HTTP service down.
 3. It must hold a *verified* copy of the vDisk whose digest is the vDisk's
    current digest (a stale, partial or mismatched copy is never served).
 4. Servers in ``exclude`` (the target reports them unreachable) are skipped.
 5. If the target already streams from a candidate (``current``), keep it:
    asking twice, or again after a load change, does not move a target.
 6. Otherwise the least-loaded candidate wins; ties go to the smaller name.
 7. No candidate → `NoServerAvailable` saying which rule removed them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pvsfarm.errors import NoServerAvailable
from pvsfarm.views import BootstrapMode, BootstrapView, CopyView, ServerState, ServerView, VDiskView


def is_live(server: ServerView, now: float, dead_after_s: float) -> bool:
    """Rule 2: up, with a heartbeat no older than the bound, streaming healthy."""
    if server.state is not ServerState.UP or server.heartbeat_at is None or not server.can_stream:
        return False
    return now - server.heartbeat_at <= dead_after_s


def eligible(
    vdisk: VDiskView,
    servers: Sequence[ServerView],
    copies: Sequence[CopyView],
    bootstrap: BootstrapView,
    now: float,
    dead_after_s: float,
    exclude: frozenset[str] = frozenset(),
) -> list[ServerView]:
    """Rules 1-4, in bootstrap order (listed) or by name (live)."""
    verified = {c.server for c in copies if c.serves(vdisk)}
    return [s for s in _live_pool(servers, bootstrap, now, dead_after_s, exclude) if s.name in verified]


def _live_pool(servers: Sequence[ServerView], bootstrap: BootstrapView, now: float, dead_after_s: float,
               exclude: frozenset[str]) -> list[ServerView]:
    """Rules 1, 2 and 4: the bootstrap's servers (listed) or all (live), live and not excluded."""
    if bootstrap.mode is BootstrapMode.LISTED:
        by_name = {s.name: s for s in servers}
        pool = [by_name[n] for n in bootstrap.servers if n in by_name]
    else:
        pool = sorted(servers, key=lambda s: s.name)
    return [s for s in pool if is_live(s, now, dead_after_s) and s.name not in exclude]


def assign(
    vdisk: VDiskView,
    servers: Sequence[ServerView],
    copies: Sequence[CopyView],
    bootstrap: BootstrapView,
    now: float,
    dead_after_s: float,
    *,
    current: str | None = None,
    exclude: frozenset[str] = frozenset(),
    extra_load: Mapping[str, int] | None = None,
) -> ServerView:
    """The server that streams ``vdisk`` (rules in the module docstring).

    ``extra_load`` adds assignments made since the loads in ``servers`` were
    read, so a burst of logins on one node spreads instead of piling up.
    """
    candidates = eligible(vdisk, servers, copies, bootstrap, now, dead_after_s, exclude)
    if not candidates:
        raise NoServerAvailable(_why_none(vdisk, servers, bootstrap, now, dead_after_s, exclude))
    for server in candidates:
        if server.name == current:
            return server
    extra = extra_load or {}
    return min(candidates, key=lambda s: (s.load + extra.get(s.name, 0), s.name))


def _why_none(
    vdisk: VDiskView,
    servers: Sequence[ServerView],
    bootstrap: BootstrapView,
    now: float,
    dead_after_s: float,
    exclude: frozenset[str],
) -> str:
    if bootstrap.mode is BootstrapMode.LISTED and not bootstrap.servers:
        return "the bootstrap names no servers (pvsfarm bootstrap configure --server ...)"
    if not _live_pool(servers, bootstrap, now, dead_after_s, exclude):
        return "no live server in the bootstrap"
    return f"no live server in the bootstrap holds a verified copy of vDisk {vdisk.name!r}"


def live_servers(servers: Sequence[ServerView], now: float, dead_after_s: float) -> list[ServerView]:
    """Every live server, by name (the farm list handed to targets in live mode)."""
    return sorted((s for s in servers if is_live(s, now, dead_after_s)), key=lambda s: s.name)
