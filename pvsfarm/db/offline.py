"""The node's offline cache: a local SQLite copy of what booting needs.

Written after every inventory refresh that changed something, read at start
when the shared database cannot be reached, so DHCP, TFTP, login and NBD keep
working through a database outage — even across a node restart. Session
events that could not be flushed are journaled here too and written back
when the database returns.
"""

from __future__ import annotations

import json
import sqlite3
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pvsfarm.addr import MacAddress
from pvsfarm.db.snapshot import Snapshot
from pvsfarm.errors import StoreError
from pvsfarm.streaming.journal import Journal, _Io
from pvsfarm.views import (BootMethod, BootstrapMode, BootstrapView, CacheType, CopyState, CopyView, DeviceView,
                           ServerState, ServerView, VDiskMode, VDiskView)

SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


_devices_json: tuple[dict[MacAddress, DeviceView], str] | None = None
"""The last devices dict encoded, and its JSON. The node saves the cache every 10 s for the
servers' rows; the devices only change with the inventory generation. json.dumps of 10,000
devices is one 4-8 ms C call holding the GIL: a stall of the node's event loop (login p99)."""


def _encode_devices(devices: dict[MacAddress, DeviceView]) -> str:
    global _devices_json
    cached = _devices_json
    if cached is not None and cached[0] is devices:
        return cached[1]
    text = json.dumps([[str(d.mac), d.name, str(d.ipv4) if d.ipv4 else None, d.collection, d.vdisk, d.enabled]
                       for d in devices.values()])
    _devices_json = (devices, text)
    return text


def snapshot_to_json(s: Snapshot) -> str:
    rest = json.dumps({
        "generation": s.generation,
        "secret": s.secret.hex(),
        "vdisks": [[v.name, v.size_bytes, v.mode.value, v.cache_type.value, v.digest, v.boot_method.value]
                   for v in s.vdisks.values()],
        "servers": [[x.name, x.address, x.http_port, x.nbd_port, x.tftp_port, x.state.value, x.heartbeat_at, x.load,
                     x.health] for x in s.servers],
        "copies": [[c.vdisk, c.server, c.path, c.digest, c.state.value] for cs in s.copies.values() for c in cs],
        "bootstrap": [list(s.bootstrap.servers), s.bootstrap.timeout_ms, s.bootstrap.mode.value, s.bootstrap.version],
    })
    return f'{rest[:-1]}, "devices": {_encode_devices(s.devices)}}}'


def snapshot_from_json(text: str) -> Snapshot:
    d = json.loads(text)
    devices = {}
    for mac, name, ip, coll, vdisk, enabled in d["devices"]:
        m = MacAddress.parse(mac)
        devices[m] = DeviceView(m, name, IPv4Address(ip) if ip else None, coll, vdisk, enabled)
    copies: dict[str, list[CopyView]] = {}
    for vdisk, server, path, digest, state in d["copies"]:
        copies.setdefault(vdisk, []).append(CopyView(vdisk, server, path, digest, CopyState(state)))
    names, timeout_ms, mode, version = d["bootstrap"]
    return Snapshot(
        devices=devices,
        vdisks={v[0]: VDiskView(v[0], v[1], VDiskMode(v[2]), CacheType(v[3]), v[4], BootMethod(v[5]))
                for v in d["vdisks"]},
        servers=tuple(ServerView(x[0], x[1], x[2], x[3], x[4], ServerState(x[5]), x[6], x[7], *x[8:])
                      for x in d["servers"]),
        copies={k: tuple(v) for k, v in copies.items()},
        bootstrap=BootstrapView(tuple(names), timeout_ms, BootstrapMode(mode), version),
        secret=bytes.fromhex(d["secret"]),
        generation=d["generation"],
    )


def journal_to_json(j: Journal) -> str:
    return json.dumps({
        "opened": [list(o) for o in j.opened],
        "io": {sid: [e.bytes_read, e.bytes_written, e.last_at] for sid, e in j.io.items()},
        "moved": j.moved,
        "ended": j.ended,
    })


def journal_from_json(text: str) -> Journal:
    d = json.loads(text)
    return Journal(opened=[tuple(o) for o in d["opened"]], io={k: _Io(*v) for k, v in d["io"].items()},
                   moved=dict(d["moved"]), ended={k: float(v) for k, v in d["ended"].items()})


class OfflineCache:
    """A tiny key/value SQLite file (stdlib sqlite3: no ORM on this path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as conn:
                conn.execute(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"offline cache {path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def _put(self, key: str, value: str) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def _get(self, key: str) -> str | None:
        with self._connect() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def save_snapshot(self, snapshot: Snapshot, saved_at: float) -> None:
        self._put("snapshot", snapshot_to_json(snapshot))
        self._put("saved_at", repr(saved_at))

    def load_snapshot(self) -> tuple[Snapshot, float] | None:
        text, at = self._get("snapshot"), self._get("saved_at")
        if text is None:
            return None
        return snapshot_from_json(text), float(at or 0.0)

    def save_journal(self, journal: Journal) -> None:
        self._put("journal", journal_to_json(journal))

    def take_journal(self) -> Journal | None:
        text = self._get("journal")
        if text is None:
            return None
        self._put("journal", journal_to_json(Journal()))
        return journal_from_json(text)

    def info(self) -> dict[str, Any]:
        loaded = self.load_snapshot()
        return {"path": str(self.path), "saved_at": loaded[1] if loaded else None,
                "generation": loaded[0].generation if loaded else None}
