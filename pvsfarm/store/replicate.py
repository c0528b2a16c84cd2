"""Keep local vDisk stores in sync: each node pulls verified copies from peers.

With local stores (``store.shared: false``, the default) a vDisk added on one
node is copied to the others over HTTP:

- Serving: ``GET /peer/vdisk/{name}`` on every node answers with this node's
  *verified, current* copy of the vDisk (404 otherwise), one byte range per
  request for resume (aiohttp's `FileResponse`: streamed with sendfile, never
  loaded in memory). The request must carry ``X-Pvsfarm-Peer: <ts>:<hmac>``
  signed with the farm secret (the one export tokens use), so only farm nodes
  can download images. The answer names the digest served (``X-Pvsfarm-Digest``).
- Pulling: `Replicator` wakes every second; for each vDisk of which this node
  has no verified copy with the current digest, and a live peer
  (`assign.is_live`) has one, it marks its own copy ``copying``, downloads to
  ``<store>/.<name>.img.partial`` (one vDisk at a time; a read stalled longer
  than `CHUNK_TIMEOUT_S` aborts; an interrupted download resumes from the
  partial file's size when the ``.digest`` sidecar names the same digest),
  writes progress at most once a second, checks the SHA-256 against the
  vDisk's digest, fsyncs and renames into ``<store>/<name>.img`` and marks the
  copy ``verified``. A mismatch deletes the partial file, marks the copy
  ``stale`` and is retried with back-off (other peers first), at most
  `MAX_ATTEMPTS` mismatches per digest (then the node logs that it gives up;
  a new digest starts over). Interrupted downloads back off and resume.
- Shared store (``store.shared: true``): nothing is copied. When a live peer's
  verified copy is readable at the same path on this node and has the vDisk's
  size, this node records its own ``verified`` copy row with that path (the
  operator declared the store shared, so the path names the same file; the
  digest was checked by whoever recorded the peer's copy). When it is not
  readable, the node logs it once per digest and copies nothing.

Stale copies are never served: `assign` and `Exports` only use a verified
copy whose digest is the vDisk's current digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pvsfarm.admin.common import audit, bump_generation, get_server, get_vdisk
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import VDisk, VDiskCopy, utcnow
from pvsfarm.db.snapshot import Snapshot, generation
from pvsfarm.errors import PvsfarmError, StoreError
from pvsfarm.streaming.assign import is_live
from pvsfarm.views import CopyState, CopyView, Inventory, ServerView, VDiskView, servable_copy

if TYPE_CHECKING:
    from pvsfarm.node import Node

log = logging.getLogger("pvsfarm.replicate")

PEER_ROUTE = "/peer/vdisk/{name}"
AUTH_HEADER = "X-Pvsfarm-Peer"
DIGEST_HEADER = "X-Pvsfarm-Digest"
AUTH_SKEW_S = 300.0
"""Accepted clock difference between nodes (as export tokens' future skew)."""
CHUNK_BYTES = 1 << 20
CHUNK_TIMEOUT_S = 30.0
"""Longest wait for the next bytes from a peer before the download is aborted."""
CONNECT_TIMEOUT_S = 5.0
ROUND_INTERVAL_S = 1.0
PROGRESS_EVERY_S = 1.0
MAX_ATTEMPTS = 5
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0


# -- peer authentication ---------------------------------------------------

def _mac(secret: bytes, name: str, ts: int) -> str:
    return hmac.new(secret, f"peer|{name}|{ts}".encode(), hashlib.sha256).hexdigest()


def peer_auth(secret: bytes, name: str, now: float) -> str:
    """The ``X-Pvsfarm-Peer`` header value for downloading vDisk ``name``."""
    ts = int(now)
    return f"{ts}:{_mac(secret, name, ts)}"


def check_peer_auth(header: str | None, secret: bytes, name: str, now: float) -> bool:
    if not header or not secret or header.count(":") != 1:
        return False
    ts_text, tag = header.split(":")
    if not ts_text.isdigit() or abs(now - int(ts_text)) > AUTH_SKEW_S:
        return False
    return hmac.compare_digest(tag, _mac(secret, name, int(ts_text)))


# -- serving ---------------------------------------------------------------

def current_copy(inventory: Inventory, node: str, name: str) -> tuple[VDiskView, Path] | None:
    """This node's verified copy of vDisk ``name`` at its current digest, if any."""
    found = servable_copy(inventory, node, name)
    return None if found is None else (found[0], Path(found[1].path))


def add_peer_routes(app: web.Application, inventory: Inventory, node: str,
                    secret: Callable[[], bytes], clock: Callable[[], float] = time.time) -> None:
    """Register ``GET /peer/vdisk/{name}`` (see the module docstring)."""

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not check_peer_auth(request.headers.get(AUTH_HEADER), secret(), name, clock()):
            raise web.HTTPForbidden(text="peer authentication required\n")
        found = current_copy(inventory, node, name)
        if found is None or not found[1].is_file():
            raise web.HTTPNotFound(text=f"no verified copy of {name} on {node}\n")
        vdisk, path = found
        return web.FileResponse(path, chunk_size=CHUNK_BYTES, headers={
            DIGEST_HEADER: vdisk.digest, "Content-Type": "application/octet-stream"})

    app.router.add_get(PEER_ROUTE, serve)


# -- planning (pure) -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Need:
    """A vDisk this node lacks, and the live peers holding a current verified copy."""

    vdisk: VDiskView
    sources: tuple[tuple[ServerView, CopyView], ...]


def needs(snapshot: Snapshot, node: str, now: float, dead_after_s: float) -> list[Need]:
    """vDisks (by name) without a current verified copy here, each with its sources by (load, name)."""
    live = {s.name: s for s in snapshot.servers if is_live(s, now, dead_after_s) and s.name != node}
    out = []
    for name in sorted(snapshot.vdisks):
        vdisk = snapshot.vdisks[name]
        copies = snapshot.copies.get(name, ())
        current = [c for c in copies if c.serves(vdisk)]
        if any(c.server == node for c in current):
            continue
        sources = sorted(((live[c.server], c) for c in current if c.server in live),
                         key=lambda sc: (sc[0].load, sc[0].name))
        if sources:
            out.append(Need(vdisk, tuple(sources)))
    return out


# -- database side (worker threads) ---------------------------------------

Sessions = Callable[[], sessionmaker[Session]]


def _own_row(session: Session, vdisk_name: str, node: str) -> tuple[VDisk, VDiskCopy]:
    vdisk = get_vdisk(session, vdisk_name)
    server = get_server(session, node)
    row = session.scalar(select(VDiskCopy).where(VDiskCopy.vdisk_id == vdisk.id,
                                                 VDiskCopy.server_id == server.id))
    if row is None:
        row = VDiskCopy(vdisk=vdisk, server=server, path="", state=CopyState.MISSING, progress_pct=0)
        session.add(row)
    return vdisk, row


def record_copy(sessions: Sessions, node: str, vdisk_name: str, path: Path, state: CopyState,
                digest: str | None, source: str) -> int:
    """Set this node's copy row; returns the inventory generation after the change.

    ``verified`` is recorded only when ``digest`` is still the vDisk's digest
    (it may have been updated during the download); otherwise ``stale``.
    """
    with session_scope(sessions()) as s:
        vdisk, row = _own_row(s, vdisk_name, node)
        if state is CopyState.VERIFIED and digest != vdisk.digest:
            state = CopyState.STALE
        row.path, row.state, row.digest, row.updated_at = str(path), state, digest, utcnow()
        row.progress_pct = 100 if state is CopyState.VERIFIED else 0
        s.flush()
        if state is CopyState.COPYING:
            bump_generation(s)
        else:
            audit(s, f"node:{node}", "replicate", "vdisk", vdisk_name, server=node, source=source,
                  state=state.value, digest=digest, path=str(path))
        s.flush()
        return generation(s)


def record_progress(sessions: Sessions, node: str, vdisk_name: str, pct: int) -> None:
    """Progress is not in the inventory, so it does not bump the generation."""
    with session_scope(sessions()) as s:
        _vdisk, row = _own_row(s, vdisk_name, node)
        if row.state is CopyState.COPYING:
            row.progress_pct, row.updated_at = pct, utcnow()


# -- downloading -----------------------------------------------------------

class Partial:
    """``<store>/.<name>.img.partial`` plus a ``.digest`` sidecar naming the
    digest it is a prefix of, so only a download of the same content resumes."""

    def __init__(self, final: Path, digest: str) -> None:
        self.final, self.digest = final, digest
        self.path = final.with_name(f".{final.name}.partial")
        self.sidecar = self.path.with_name(self.path.name + ".digest")
        self.hasher = hashlib.sha256()
        self.size = 0
        self._file: Any = None

    def open(self, max_bytes: int) -> int:
        """Open for appending; returns the offset to resume from (0 when starting over)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        same = self.sidecar.is_file() and self.sidecar.read_text().strip() == self.digest
        if same and self.path.is_file() and self.path.stat().st_size <= max_bytes:
            self._file = self.path.open("r+b")
            while chunk := self._file.read(CHUNK_BYTES):
                self.hasher.update(chunk)
                self.size += len(chunk)
        else:
            self.discard()
            self.sidecar.write_text(self.digest + "\n")
            self._file = self.path.open("w+b")
        return self.size

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.hasher, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()

    def commit(self) -> None:
        """fsync, rename over the final name (open readers keep the old file), fsync the directory."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        os.replace(self.path, self.final)
        self.sidecar.unlink(missing_ok=True)
        dir_fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)


def _expect_offset(resp: aiohttp.ClientResponse, offset: int, digest: str) -> bool:
    """Check the peer's answer; True when it restarts from byte 0 (a 200 to a range request)."""
    if resp.status not in (200, 206):
        raise StoreError(f"peer answered HTTP {resp.status}")
    served = resp.headers.get(DIGEST_HEADER)
    if served != digest:
        raise StoreError(f"peer serves digest {served}, wanted {digest}")
    if resp.status == 206:
        start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if start != str(offset):
            raise StoreError(f"peer answered range {resp.headers.get('Content-Range')!r} for offset {offset}")
        return False
    return offset > 0


@dataclass
class Failure:
    attempts: int = 0
    mismatches: int = 0
    next_at: float = 0.0
    bad_sources: set[str] = field(default_factory=set)


# -- the loop --------------------------------------------------------------

@dataclass
class Replicator:
    inventory: Any
    """A `MemoryInventory` (the loop reads its ``snapshot``)."""
    sessions: Sessions
    node: str
    store: Path
    shared: bool
    dead_after_s: float
    clock: Callable[[], float] = time.time
    interval_s: float = ROUND_INTERVAL_S
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)
    settled_generation: int = -1
    """Generation after our last change: until the inventory has caught up, it
    would still show the copy as missing, so no new round starts."""
    _told: set[tuple[str, str]] = field(default_factory=set)
    _last_error: str = ""

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=CHUNK_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
            while not self.stopping.is_set():
                try:
                    await self.round(http)
                    self._last_error = ""
                except PvsfarmError as exc:
                    if str(exc) != self._last_error:  # e.g. the database is down: say it once
                        log.warning("replication round failed: %s", exc)
                    self._last_error = str(exc)
                except Exception:  # noqa: BLE001 - the loop must outlive any one bad round
                    log.exception("replication round failed; retrying")
                try:
                    await asyncio.wait_for(self.stopping.wait(), self.interval_s)
                except TimeoutError:
                    pass

    async def round(self, http: aiohttp.ClientSession) -> None:
        """One pass: at most one vDisk is copied (or adopted on a shared store)."""
        snapshot: Snapshot = self.inventory.snapshot
        if snapshot.generation < self.settled_generation:
            return
        now = self.clock()
        todo = needs(snapshot, self.node, now, self.dead_after_s)
        wanted = {(n.vdisk.name, n.vdisk.digest) for n in todo}
        self.failures = {k: v for k, v in self.failures.items() if k in wanted}
        for need in todo:
            key = (need.vdisk.name, need.vdisk.digest)
            failure = self.failures.get(key, Failure())
            if failure.mismatches >= MAX_ATTEMPTS or failure.next_at > now:
                continue
            if self.shared:
                await self._adopt(need)
                continue
            sources = sorted(need.sources, key=lambda sc: sc[0].name in failure.bad_sources)
            await self._fetch(http, need.vdisk, sources[0][0])
            return

    async def _adopt(self, need: Need) -> None:
        for server, copy in need.sources:
            path = Path(copy.path)
            if os.access(path, os.R_OK) and path.is_file() and path.stat().st_size == need.vdisk.size_bytes:
                self.settled_generation = await asyncio.to_thread(
                    record_copy, self.sessions, self.node, need.vdisk.name, path, CopyState.VERIFIED,
                    need.vdisk.digest, server.name)
                log.info("shared store: using %s's copy of %s at %s", server.name, need.vdisk.name, path)
                return
        key = (need.vdisk.name, need.vdisk.digest)
        if key not in self._told:
            self._told.add(key)
            log.warning("shared store: no peer copy of %s is readable here (%s); nothing is copied on a shared "
                        "store", need.vdisk.name, ", ".join(c.path for _s, c in need.sources))

    async def _fetch(self, http: aiohttp.ClientSession, vdisk: VDiskView, source: ServerView) -> None:
        final = self.store.resolve() / f"{vdisk.name}.img"
        partial = Partial(final, vdisk.digest)
        await self._record(vdisk, final, CopyState.COPYING, None, source.name)
        log.info("replicating vDisk %s (%d MiB) from %s", vdisk.name, vdisk.size_bytes >> 20, source.name)
        try:
            await asyncio.to_thread(partial.open, vdisk.size_bytes)
            await self._download(http, vdisk, source, partial)
        except (aiohttp.ClientError, TimeoutError, OSError, StoreError) as exc:
            partial.close()
            self._failed(vdisk, source.name, bad=False)
            log.warning("replicating %s from %s interrupted at %d MiB (will resume): %s",
                        vdisk.name, source.name, partial.size >> 20, exc)
            return
        if partial.size == vdisk.size_bytes and partial.hexdigest() == vdisk.digest:
            await asyncio.to_thread(partial.commit)
            await self._record(vdisk, final, CopyState.VERIFIED, vdisk.digest, source.name)
            self.failures.pop((vdisk.name, vdisk.digest), None)
            log.info("vDisk %s: verified copy from %s at %s", vdisk.name, source.name, final)
            return
        got = partial.hexdigest()
        await asyncio.to_thread(partial.discard)
        await self._record(vdisk, final, CopyState.STALE, got, source.name)
        attempts = self._failed(vdisk, source.name, bad=True)
        log.error("DIGEST MISMATCH replicating vDisk %s from %s: got %s (%d bytes), want %s; copy marked stale, "
                  "partial file deleted (mismatch %d of %d)", vdisk.name, source.name, got, partial.size,
                  vdisk.digest, attempts, MAX_ATTEMPTS)

    async def _record(self, vdisk: VDiskView, path: Path, state: CopyState, digest: str | None,
                      source: str) -> None:
        self.settled_generation = await asyncio.to_thread(
            record_copy, self.sessions, self.node, vdisk.name, path, state, digest, source)

    async def _download(self, http: aiohttp.ClientSession, vdisk: VDiskView, source: ServerView,
                        partial: Partial) -> None:
        if partial.size == vdisk.size_bytes:
            return
        url = f"http://{source.address}:{source.http_port}{PEER_ROUTE.format(name=vdisk.name)}"
        headers = {AUTH_HEADER: peer_auth(self.inventory.snapshot.secret, vdisk.name, self.clock()),
                   "Accept-Encoding": "identity"}
        if partial.size:
            headers["Range"] = f"bytes={partial.size}-"
        async with http.get(url, headers=headers) as resp:
            if _expect_offset(resp, partial.size, vdisk.digest):
                await asyncio.to_thread(partial.restart)
            report = self._progress(vdisk, source.name)
            buf = bytearray()
            try:
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    if partial.size + len(buf) + len(chunk) > vdisk.size_bytes:
                        raise StoreError(f"peer sent more than the vDisk's {vdisk.size_bytes} bytes")
                    buf += chunk
                    if len(buf) >= CHUNK_BYTES:
                        await asyncio.to_thread(partial.write, bytes(buf))
                        buf.clear()
                        await report(partial.size)
                    if self.stopping.is_set():
                        raise StoreError("node stopping")
            finally:  # what arrived before an interruption is kept for the resume
                await asyncio.to_thread(partial.write, bytes(buf))

    def _progress(self, vdisk: VDiskView, source: str) -> Callable[[int], Any]:
        last = [time.monotonic()]

        async def report(done: int) -> None:
            now = time.monotonic()
            if now - last[0] < PROGRESS_EVERY_S:
                return
            last[0] = now
            pct = min(99, 100 * done // max(1, vdisk.size_bytes))
            log.info("replicating %s from %s: %d%% (%d/%d MiB)", vdisk.name, source, pct, done >> 20,
                     vdisk.size_bytes >> 20)
            await asyncio.to_thread(record_progress, self.sessions, self.node, vdisk.name, pct)

        return report

    def _failed(self, vdisk: VDiskView, source: str, *, bad: bool) -> int:
        key = (vdisk.name, vdisk.digest)
        failure = self.failures.setdefault(key, Failure())
        failure.attempts += 1
        failure.next_at = self.clock() + min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (failure.attempts - 1))
        if not bad:
            return failure.mismatches
        failure.mismatches += 1
        failure.bad_sources.add(source)
        if failure.mismatches >= MAX_ATTEMPTS:
            log.error("giving up replicating vDisk %s at digest %s after %d attempts; fix the source copy "
                      "(pvsfarm vdisk copy / vdisk update) or restart this node", vdisk.name, vdisk.digest,
                      failure.mismatches)
        return failure.mismatches


def replicator_for(node: Node) -> Replicator:
    """The node's replicator, stopping with the node."""
    cfg = node.cfg
    return Replicator(node.inventory, node.app.sessions, cfg.name, cfg.store_path, cfg.store.shared,
                      cfg.dead_after_s, stopping=node.stopping)


__all__ = ["add_peer_routes", "needs", "peer_auth", "check_peer_auth", "record_copy", "Replicator",
           "replicator_for", "Partial", "Need"]
