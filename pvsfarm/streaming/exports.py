"""Export names → block devices, for NBD and HTTP range reads.

A target opens the export it was given at login: a signed token naming its
session, device, vDisk and this server (see `tokens`). An administrator may
open a vDisk read-only by name from loopback (configurable). Anything else —
unknown, forged, expired, or meant for another server — gets nothing, and the
caller answers "unknown export" without saying why.

The connections of one session share one device (`SharedDevice`), so a
target's NBD connections and its HTTP sanboot reads see the same write cache.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pvsfarm.addr import is_loopback
from pvsfarm.errors import Conflict, PvsfarmError
from pvsfarm.streaming.assign import is_live
from pvsfarm.store import BaseImage, PrivateImage, SharedDevice, WriteCache
from pvsfarm.streaming.journal import Journal
from pvsfarm.streaming.nbd.backend import BlockDevice, OpenedExport
from pvsfarm.streaming.tokens import ExportGrant, verify
from pvsfarm.views import CacheType, Inventory, VDiskMode, VDiskView, servable_copy

log = logging.getLogger("pvsfarm.exports")


OWNER_SUFFIX = ".owner"


def _set_owner(cache: Path, node: str) -> None:
    cache.with_name(cache.name + OWNER_SUFFIX).write_text(node)


def _owner(cache: Path) -> str | None:
    try:
        return cache.with_name(cache.name + OWNER_SUFFIX).read_text().strip() or None
    except OSError:
        return None


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy only the data extents (SEEK_DATA/SEEK_HOLE): a cache's slots are mostly holes."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole remains
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            pos = start
            while pos < end:
                chunk = os.pread(fin.fileno(), min(1 << 20, end - pos), pos)
                os.pwrite(fout.fileno(), chunk, pos)
                pos += len(chunk)
            offset = end
        fout.truncate(size)
        fout.flush()
        os.fsync(fout.fileno())


@dataclass
class Exports:
    inventory: Inventory
    secret: Callable[[], bytes]
    node: str
    cache_dir: Path
    journal: Journal
    clock: Callable[[], float]
    token_ttl_s: float = 86400.0
    admin_from_loopback_only: bool = True
    dead_after_s: float = 5.0
    _sessions: dict[str, SharedDevice] = field(default_factory=dict)
    _drops: dict[str, list[Callable[[], None]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def list_exports(self, peer: tuple[str, int]) -> list[str]:
        """Only administrators on loopback may list (vDisk names); tokens are never listed."""
        if self.admin_from_loopback_only and not is_loopback(peer[0]):
            return []
        return sorted(self.inventory.snapshot.vdisks) if hasattr(self.inventory, "snapshot") else []

    def open_export(self, name: str, peer: tuple[str, int]) -> OpenedExport | None:
        try:
            return self._open(name, peer)
        except PvsfarmError as exc:
            log.warning("export open refused for %s: %s", peer[0], exc)
            return None

    def _open(self, name: str, peer: tuple[str, int]) -> OpenedExport | None:
        if "." not in name:
            return self._open_admin(name, peer)
        grant = verify(name, self.secret(), self.clock(), self.token_ttl_s)
        if grant.server != self.node:
            return None
        found = servable_copy(self.inventory, self.node, grant.vdisk)
        if found is None:
            return None
        vdisk, path = found[0], Path(found[1].path)
        handle = self._session_device(grant, vdisk, path).handle()
        sid = grant.session_id

        def on_io(bytes_read: int, bytes_written: int) -> None:
            self.journal.record_io(sid, bytes_read, bytes_written, self.clock())

        return OpenedExport(handle, f"{vdisk.name} for {grant.mac}", on_io, lambda: self._forget(sid),
                            lambda drop: self._bind(sid, drop))

    def _open_admin(self, name: str, peer: tuple[str, int]) -> OpenedExport | None:
        if self.admin_from_loopback_only and not is_loopback(peer[0]):
            return None
        found = servable_copy(self.inventory, self.node, name)
        if found is None:
            return None
        path = Path(found[1].path)
        log.info("admin read-only open of vDisk %s from %s", name, peer[0])
        return OpenedExport(BaseImage(path, name=name), f"{name} (read-only inspection)")

    def _session_device(self, grant: ExportGrant, vdisk: VDiskView, path: Path) -> SharedDevice:
        with self._lock:
            shared = self._sessions.get(grant.session_id)
            if shared is None or shared.device is None:
                shared = SharedDevice(self._make_device(grant, vdisk, path))
                self._sessions[grant.session_id] = shared
            return shared

    def _make_device(self, grant: ExportGrant, vdisk: VDiskView, path: Path) -> BlockDevice:
        if vdisk.mode is VDiskMode.PRIVATE:
            return PrivateImage(path, name=vdisk.name, owner=f"{grant.mac} via {self.node}")
        if vdisk.cache_type is CacheType.DEVICE_RAM:
            return BaseImage(path, name=vdisk.name)
        return self._write_cache(grant, vdisk, path)

    def _write_cache(self, grant: ExportGrant, vdisk: VDiskView, path: Path) -> WriteCache:
        prefix = grant.mac.replace(":", "-")
        cache = self.cache_dir / f"{prefix}--{grant.session_id}.cow"
        if cache.exists():
            try:
                opened = WriteCache.open_existing(path, cache, base_id=vdisk.digest)
            except Conflict:
                opened = self._take_over(cache, path, vdisk)
            _set_owner(cache, self.node)
            return opened
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for old in self.cache_dir.glob(f"{prefix}--*.cow"):
            # A new session is a new boot: the device's older write caches are discarded.
            old.unlink(missing_ok=True)
        created = WriteCache.create(path, cache, base_id=vdisk.digest)
        _set_owner(cache, self.node)
        return created

    def _take_over(self, cache: Path, base: Path, vdisk: VDiskView) -> WriteCache:
        """The cache is still locked by the node that served the target before.

        If that node is live, refuse (the target must not be served twice).
        If it is dead by heartbeat — e.g. hung, still holding the lock — fence
        it off: copy the cache (sparse) beside it and rename the copy over the
        name. The hung process keeps only the orphaned old inode, so whatever
        it does when it wakes can never reach the target's cache again; writes
        it never acknowledged are not lost, they were never the target's.
        """
        holder = _owner(cache)
        servers = {s.name: s for s in self.inventory.servers()}
        held_by = servers.get(holder) if holder else None
        if holder == self.node or (held_by is not None and is_live(held_by, self.clock(), self.dead_after_s)):
            raise Conflict(f"write cache of this session is open on live server {holder!r}")
        log.warning("taking over write cache %s from dead server %s", cache.name, holder or "?")
        tmp = cache.with_name(f".{cache.name}.takeover")
        copy_sparse(cache, tmp)
        os.replace(tmp, cache)
        return WriteCache.open_existing(base, cache, base_id=vdisk.digest)

    def _bind(self, session_id: str, drop: Callable[[], None]) -> None:
        with self._lock:
            self._drops.setdefault(session_id, []).append(drop)

    def _forget(self, session_id: str) -> None:
        with self._lock:
            shared = self._sessions.get(session_id)
            if shared is not None and shared.device is None:
                del self._sessions[session_id]
                self._drops.pop(session_id, None)

    def move_one_session(self) -> str | None:
        """Drop every NBD connection of one session (a draining node sends its
        targets away one at a time: each logs in again and lands elsewhere)."""
        with self._lock:
            for sid, drops in self._drops.items():
                shared = self._sessions.get(sid)
                if drops and shared is not None and shared.device is not None:
                    self._drops[sid] = []
                    break
            else:
                return None
        for drop in drops:
            drop()
        return sid

    def open_sessions(self) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.device is not None)
