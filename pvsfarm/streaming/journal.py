"""Stream-session bookkeeping, batched: never a database write per request.

Login and NBD record events here in memory (a dict update); the node flushes
them to the database every few seconds in one transaction. While the
database is unreachable the events simply accumulate and are written back
when it returns.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.orm import Session

from pvsfarm.db.models import Device, Server, StreamSession, VDisk
from pvsfarm.db.snapshot import open_sessions_by_server


OpenEvent = tuple[str, str, str, str, float]
"""(session id, MAC, vDisk, server, at), stored as a plain tuple: the cyclic GC stops tracking
an exact tuple of strings and floats after one pass (not a NamedTuple or a dataclass). A
dataclass here kept every login of a flush round (10k-130k under the login benchmark) in the
full collections, which then stopped the event loop for up to 84 ms."""


class _Open(NamedTuple):
    """An `OpenEvent` with names, built only while flushing."""

    session_id: str
    mac: str
    vdisk: str
    server: str
    at: float


@dataclass
class _Io:
    bytes_read: int = 0
    bytes_written: int = 0
    last_at: float = 0.0


@dataclass
class Journal:
    """Pending session events; thread-safe (NBD runs on the loop, flush in a thread)."""

    opened: list[OpenEvent] = field(default_factory=list)
    io: dict[str, _Io] = field(default_factory=dict)
    moved: dict[str, str] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, session_id: str, mac: str, vdisk: str, server: str, at: float) -> None:
        with self._lock:
            self.opened.append((session_id, mac, vdisk, server, at))

    def record_io(self, session_id: str, bytes_read: int, bytes_written: int, at: float) -> None:
        with self._lock:
            entry = self.io.get(session_id)
            if entry is None:
                entry = self.io[session_id] = _Io()
            entry.bytes_read += bytes_read
            entry.bytes_written += bytes_written
            entry.last_at = at

    def move(self, session_id: str, server: str) -> None:
        """A failed-over session now streams from ``server``."""
        with self._lock:
            self.moved[session_id] = server

    def end(self, session_id: str, at: float) -> None:
        with self._lock:
            self.ended[session_id] = at

    def open_events(self) -> list[_Open]:
        return [_Open._make(event) for event in _first_opens(self.opened)]

    def pending(self) -> int:
        with self._lock:
            return len(self.opened) + len(self.io) + len(self.moved) + len(self.ended)

    def take(self) -> Journal:
        """Detach everything pending (put it back with `restore` if the flush fails)."""
        with self._lock:
            batch = Journal(self.opened, self.io, self.moved, self.ended)
            self.opened, self.io, self.moved, self.ended = [], {}, {}, {}
            return batch

    def restore(self, batch: Journal) -> None:
        with self._lock:
            self.opened[:0] = batch.opened
            for sid, entry in batch.io.items():
                mine = self.io.setdefault(sid, _Io())
                mine.bytes_read += entry.bytes_read
                mine.bytes_written += entry.bytes_written
                mine.last_at = max(mine.last_at, entry.last_at)
            self.moved = {**batch.moved, **self.moved}
            self.ended = {**batch.ended, **self.ended}


def _first_opens(opened: list[OpenEvent]) -> list[OpenEvent]:
    """Each session's first open: a failed-over session is opened again by the server it moved to
    (in case its first server died before flushing), and both opens can meet in one batch."""
    first: dict[str, OpenEvent] = {}
    for event in opened:
        first.setdefault(event[0], event)
    return list(first.values())


def _ts(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc)


def _ids(session: Session, model: type, column: object, keys: set[str]) -> dict[str, int]:
    if not keys:
        return {}
    rows = session.execute(select(column, model.id).where(column.in_(keys)))  # type: ignore[attr-defined]
    return {k: i for k, i in rows}


def write_batch(session: Session, batch: Journal) -> None:
    """Apply a detached batch in the caller's transaction, in a few bulk statements."""
    if session.get_bind().dialect.name == "postgresql":
        _write_batch_pg(session, batch)
        return
    events = batch.open_events()
    devices = _ids(session, Device, Device.mac, {o.mac for o in events})
    vdisks = _ids(session, VDisk, VDisk.name, {o.vdisk for o in events})
    servers = _ids(session, Server, Server.name, {o.server for o in events} | set(batch.moved.values()))
    known = set(session.scalars(select(StreamSession.token).where(
        StreamSession.token.in_({o.session_id for o in events})))) if events else set()
    # a journal replayed after a crash (written back, not yet cleared) must not insert twice
    opened = [o for o in events if o.mac in devices and o.vdisk in vdisks and o.server in servers
              and o.session_id not in known]
    ended = dict(batch.ended)
    last_open: dict[str, _Open] = {}
    for o in opened:  # a device that logged in twice in one batch: the earlier session ends at the later login
        if o.mac in last_open:
            ended[last_open[o.mac].session_id] = o.at
        last_open[o.mac] = o
    if opened:
        first_at = min(o.at for o in opened)
        session.execute(
            update(StreamSession)
            .where(StreamSession.device_id.in_({devices[o.mac] for o in opened}), StreamSession.ended_at.is_(None))
            .values(ended_at=_ts(first_at))
        )
        session.execute(insert(StreamSession), [
            {"token": o.session_id, "device_id": devices[o.mac], "vdisk_id": vdisks[o.vdisk],
             "server_id": servers[o.server], "started_at": _ts(o.at), "bytes_read": 0, "bytes_written": 0}
            for o in opened
        ])
    _bulk_update(session, [{"sid": sid, "server_id": servers[s]} for sid, s in batch.moved.items() if s in servers],
                 server_id=bindparam("server_id"))
    _bulk_update(session, [
        {"sid": sid, "r": e.bytes_read, "w": e.bytes_written, "at": _ts(e.last_at)} for sid, e in batch.io.items()
    ], bytes_read=StreamSession.bytes_read + bindparam("r"), bytes_written=StreamSession.bytes_written + bindparam("w"),
        last_io_at=bindparam("at"))
    _bulk_update(session, [{"sid": sid, "at": _ts(at)} for sid, at in ended.items()], ended_at=bindparam("at"))


def _bulk_update(session: Session, rows: list[dict[str, object]], **values: object) -> None:
    if not rows:
        return
    stmt = update(StreamSession.__table__).where(StreamSession.__table__.c.token == bindparam("sid")).values(**values)
    session.connection().execute(stmt, rows)


# PostgreSQL: one statement per kind of event, each column passed as one comma-joined string and
# split by the server (string_to_array). Same rows as the portable path in write_batch, but the
# flush thread holds the GIL only for short, preemptible list building: SQLAlchemy's per-row
# parameter processing was 19% of the node's GIL time at 10k logins/s (py-spy --gil,
# benchmarks/login_bench.py), and psycopg2 adapting Python lists to arrays is one uninterruptible
# C call (~10 ms for 5,000 logins), a stall of the event loop. Names are mapped to ids here, so
# only hex ids, MACs, integers and floats travel in the strings (none contains a comma).
_PG_KNOWN = text("SELECT token FROM stream_sessions WHERE token = ANY(string_to_array(:sids, ','))")
_PG_OPEN = text("""
WITH new AS (
    SELECT u.sid, d.id AS device_id, u.vdisk_id, u.server_id, u.at, CAST(NULLIF(u.end_at, '') AS float8) AS end_at, u.n
    FROM unnest(string_to_array(:sids, ','), string_to_array(:macs, ','),
                CAST(string_to_array(:vdisk_ids, ',') AS int[]), CAST(string_to_array(:server_ids, ',') AS int[]),
                CAST(string_to_array(:ats, ',') AS float8[]), string_to_array(:end_ats, ','))
        WITH ORDINALITY AS u(sid, mac, vdisk_id, server_id, at, end_at, n)
    JOIN devices d ON d.mac = u.mac),
earlier AS (UPDATE stream_sessions SET ended_at = to_timestamp((SELECT min(at) FROM new))
            WHERE ended_at IS NULL AND device_id IN (SELECT device_id FROM new))
INSERT INTO stream_sessions (token, device_id, vdisk_id, server_id, started_at, ended_at, bytes_read, bytes_written)
SELECT sid, device_id, vdisk_id, server_id, to_timestamp(at),
       to_timestamp(COALESCE(end_at, lead(at) OVER (PARTITION BY device_id ORDER BY n))), 0, 0
FROM new""")
"""Inserts new sessions (ended already when the batch ends them); a device's open sessions end at
its first new login; a device that logged in twice in one batch has the earlier session end at
the later login (``lead``), unless the batch ends it explicitly."""
_PG_MOVE = text("""
UPDATE stream_sessions AS x SET server_id = u.server_id
FROM unnest(string_to_array(:sids, ','), CAST(string_to_array(:server_ids, ',') AS int[])) AS u(sid, server_id)
WHERE x.token = u.sid""")
_PG_IO = text("""
UPDATE stream_sessions AS x SET bytes_read = x.bytes_read + u.r, bytes_written = x.bytes_written + u.w,
    last_io_at = to_timestamp(u.at)
FROM unnest(string_to_array(:sids, ','), CAST(string_to_array(:r, ',') AS bigint[]),
            CAST(string_to_array(:w, ',') AS bigint[]), CAST(string_to_array(:ats, ',') AS float8[]))
    AS u(sid, r, w, at)
WHERE x.token = u.sid""")
_PG_END = text("""
UPDATE stream_sessions AS x SET ended_at = to_timestamp(u.at)
FROM unnest(string_to_array(:sids, ','), CAST(string_to_array(:ats, ',') AS float8[])) AS u(sid, at)
WHERE x.token = u.sid""")


def _csv(values: Iterable[object]) -> str:
    return ",".join(map(str, values))  # str(float) round-trips exactly (repr since Python 3.2)


def _write_batch_pg(session: Session, batch: Journal) -> None:
    """`write_batch` on PostgreSQL. Sessions already in the database (a replayed batch) are not
    inserted again and end nothing; rows naming an unknown device, vDisk or server are dropped.
    Ends of older sessions are written first, so the insert's "end the device's open sessions"
    skips them, and a session opened in this batch is inserted with its end: every row is written
    once (a second update of a row this transaction wrote also re-runs its three FK checks)."""
    run = session.connection().execute
    servers: dict[str, int] = dict(run(select(Server.name, Server.id)).all())  # type: ignore[arg-type]
    new: list[OpenEvent] = []  # plain tuples, not _Open: a batch can hold 100k of them (see OpenEvent)
    if batch.opened:
        vdisks: dict[str, int] = dict(run(select(VDisk.name, VDisk.id)).all())  # type: ignore[arg-type]
        known = set(run(_PG_KNOWN, {"sids": _csv(e[0] for e in batch.opened)}).scalars())
        new = [e for e in _first_opens(batch.opened) if e[0] not in known and e[2] in vdisks and e[3] in servers]
    new_ids = {e[0] for e in new}
    older = {sid: at for sid, at in batch.ended.items() if sid not in new_ids}
    if older:
        run(_PG_END, {"sids": _csv(older), "ats": _csv(older.values())})
    if new:
        run(_PG_OPEN, {"sids": _csv(e[0] for e in new), "macs": _csv(e[1] for e in new),
                       "vdisk_ids": _csv(vdisks[e[2]] for e in new), "server_ids": _csv(servers[e[3]] for e in new),
                       "ats": _csv(e[4] for e in new), "end_ats": _csv(batch.ended.get(e[0], "") for e in new)})
    moved = {sid: servers[name] for sid, name in batch.moved.items() if name in servers}
    if moved:
        run(_PG_MOVE, {"sids": _csv(moved), "server_ids": _csv(moved.values())})
    if batch.io:
        io = batch.io.values()
        run(_PG_IO, {"sids": _csv(batch.io), "r": _csv(e.bytes_read for e in io),
                     "w": _csv(e.bytes_written for e in io), "ats": _csv(e.last_at for e in io)})


def live_load(session: Session, server_name: str) -> int:
    """Open stream sessions on one server (its load)."""
    server_id = session.scalar(select(Server.id).where(Server.name == server_name))
    return open_sessions_by_server(session).get(server_id, 0) if server_id is not None else 0
