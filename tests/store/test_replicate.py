"""vDisk copies in sync: peers pull verified copies over HTTP; stale copies are never served."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import create_engine, text

from pvsfarm.admin.farm import ensure_server
from pvsfarm.admin.vdisks import add_vdisk, vdisk_status
from pvsfarm.app import App
from pvsfarm.config import NodeConfig
from pvsfarm.db.engine import session_scope
from pvsfarm.db.models import utcnow
from pvsfarm.db.snapshot import MemoryInventory, Snapshot, load_snapshot
from pvsfarm.store import replicate
from pvsfarm.store.replicate import AUTH_HEADER, DIGEST_HEADER, Replicator, check_peer_auth, needs, peer_auth
from pvsfarm.streaming.assign import eligible
from pvsfarm.streaming.exports import Exports
from pvsfarm.streaming.journal import Journal
from pvsfarm.streaming.tokens import ExportGrant, sign
from pvsfarm.views import (
    BootMethod,
    BootstrapMode,
    BootstrapView,
    CacheType,
    CopyState,
    CopyView,
    ServerState,
    ServerView,
    VDiskMode,
    VDiskView,
)
from tests.nodes import RunningNode, admin, start_node

NOW = 1_000_000.0
NEW, OLD = "sha256:" + "b" * 64, "sha256:" + "a" * 64


def server(name: str, load: int = 0, state: ServerState = ServerState.UP, age: float = 1.0) -> ServerView:
    return ServerView(name, "127.0.0.1", 8080, 10809, 69, state, NOW - age, load)


def vdisk(name: str = "base", digest: str = NEW) -> VDiskView:
    return VDiskView(name, 1 << 20, VDiskMode.STANDARD, CacheType.DEVICE_RAM, digest, BootMethod.SANBOOT)


def snapshot(servers: tuple[ServerView, ...], copies: tuple[CopyView, ...], digest: str = NEW) -> Snapshot:
    return Snapshot(vdisks={"base": vdisk(digest=digest)}, servers=servers, copies={"base": copies},
                    secret=b"s" * 32, generation=1)


# -- pure parts ------------------------------------------------------------

def test_needs_lists_only_missing_vdisks_with_live_current_sources() -> None:
    servers = (server("n1", load=3), server("n2"), server("n3", age=60), server("n4"), server("me"))
    copies = (CopyView("base", "n1", "/s/base.img", NEW, CopyState.VERIFIED),
              CopyView("base", "n2", "/s/base.img", NEW, CopyState.VERIFIED),
              CopyView("base", "n3", "/s/base.img", NEW, CopyState.VERIFIED),  # dead
              CopyView("base", "n4", "/s/base.img", OLD, CopyState.VERIFIED),  # old digest
              CopyView("base", "me", "/s/base.img", OLD, CopyState.VERIFIED))  # mine is stale
    [need] = needs(snapshot(servers, copies), "me", NOW, 5.0)
    assert [s.name for s, _c in need.sources] == ["n2", "n1"]  # least loaded first
    mine = copies[:4] + (CopyView("base", "me", "/s/base.img", NEW, CopyState.VERIFIED),)
    assert needs(snapshot(servers, mine), "me", NOW, 5.0) == []
    assert needs(snapshot(servers, copies[2:]), "me", NOW, 5.0) == []  # no live current source


def test_peer_auth_binds_secret_name_and_time() -> None:
    header = peer_auth(b"k" * 32, "base", NOW)
    assert check_peer_auth(header, b"k" * 32, "base", NOW + 10)
    assert not check_peer_auth(header, b"x" * 32, "base", NOW)
    assert not check_peer_auth(header, b"k" * 32, "other", NOW)
    assert not check_peer_auth(header, b"k" * 32, "base", NOW + 3600)
    for bad in (None, "", "garbage", "1:2:3", "x:" + "0" * 64):
        assert not check_peer_auth(bad, b"k" * 32, "base", NOW)


@pytest.mark.parametrize("state,digest", [(CopyState.STALE, NEW), (CopyState.VERIFIED, OLD),
                                          (CopyState.COPYING, None)])
def test_a_stale_copy_is_never_assigned_nor_exported(tmp_path: Path, state: CopyState, digest: str | None) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(os.urandom(1 << 20))
    copies = (CopyView("base", "n1", str(image), NEW, CopyState.VERIFIED),
              CopyView("base", "n2", str(image), digest, state))
    snap = snapshot((server("n1", load=9), server("n2")), copies)
    boot = BootstrapView(("n1", "n2"), 5000, BootstrapMode.LISTED, 1)
    assert [s.name for s in eligible(vdisk(), snap.servers, copies, boot, NOW, 5.0)] == ["n1"]

    def export_on_n2(snap: Snapshot) -> object:
        exports = Exports(MemoryInventory(snap), lambda: snap.secret, "n2", tmp_path / "wc", Journal(), lambda: NOW)
        token = sign(ExportGrant("sid", "52:54:00:00:00:01", "base", "n2", int(NOW)), snap.secret)
        return exports.open_export(token, ("10.0.0.9", 1234))

    assert export_on_n2(snap) is None
    fresh = snapshot(snap.servers, (copies[0], CopyView("base", "n2", str(image), NEW, CopyState.VERIFIED)))
    assert export_on_n2(fresh) is not None  # control: the same token opens once the copy is current


# -- the replicator in-process, against a scripted peer --------------------

class Peer:
    """A fake peer: serves ``data`` slowly; the first request is cut off halfway."""

    def __init__(self, data: bytes, digest: str) -> None:
        self.data, self.digest = data, digest
        self.ranges: list[str | None] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        resp = web.StreamResponse(status=206 if rng else 200, headers={
            DIGEST_HEADER: self.digest, "Content-Length": str(len(self.data) - start),
            **({"Content-Range": f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"} if rng else {})})
        await resp.prepare(request)
        stop = len(self.data) // 2 if len(self.ranges) == 1 else len(self.data)
        for offset in range(start, stop, 256 << 10):
            await resp.write(self.data[offset:min(stop, offset + (256 << 10))])
            await asyncio.sleep(0.15 if len(self.ranges) > 1 else 0.02)
        if stop < len(self.data):
            assert request.transport is not None
            request.transport.close()  # the peer dies mid-transfer
        return resp


def seed(app: App, peer_port: int, image: Path) -> None:
    with session_scope(app.sessions()) as s:
        me = ensure_server(s, "me", "127.0.0.1", http_port=1, nbd_port=2, tftp_port=3)
        peer = ensure_server(s, "peer", "127.0.0.1", http_port=peer_port, nbd_port=2, tftp_port=3)
        for srv in (me, peer):
            srv.state, srv.heartbeat_at = ServerState.UP, utcnow()
        add_vdisk(s, "test", peer, "base", image, image.parent, mode=VDiskMode.STANDARD,
                  cache_type=CacheType.SERVER, boot_method=BootMethod.SANBOOT, copy=False)


def copy_row(app: App) -> tuple[str, str | None, int]:
    with session_scope(app.sessions()) as s:
        rows = {r["server"]: r for r in vdisk_status(s, "base")}
    return rows["me"]["state"], rows["me"]["path"], rows["me"]["progress_pct"]


async def test_download_resumes_reports_progress_and_verifies(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicate, "PROGRESS_EVERY_S", 0.1)  # the 4 MiB transfer takes ~1 s
    data = os.urandom(4 << 20)
    (tmp_path / "src").mkdir()
    image = tmp_path / "src" / "base.img"
    image.write_bytes(data)
    peer = Peer(data, "sha256:" + hashlib.sha256(data).hexdigest())
    webapp = web.Application()
    webapp.router.add_get("/peer/vdisk/{name}", peer.handle)
    runner = web.AppRunner(webapp)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app = App(NodeConfig(name="me", data_dir=str(tmp_path / "me")), f"sqlite:///{tmp_path / 'farm.sqlite'}")
    try:
        seed(app, runner.addresses[0][1], image)
        inventory = MemoryInventory()
        rep = Replicator(inventory, app.sessions, "me", tmp_path / "store", False, 5.0)
        partial = tmp_path / "store" / ".base.img.partial"
        async with aiohttp.ClientSession() as http:
            caplog.set_level(logging.INFO, "pvsfarm.replicate")
            for _round in range(2):
                with session_scope(app.sessions()) as s:
                    inventory.replace(load_snapshot(s))
                await rep.round(http)
                if _round == 0:  # bytes still buffered when the peer died are dropped: resume where the file ends
                    kept = partial.stat().st_size
                    assert copy_row(app)[0] == "copying" and 0 < kept <= len(data) // 2
                    rep.failures[("base", peer.digest)].next_at = 0  # skip the back-off
        assert peer.ranges == [None, f"bytes={kept}-"]
        assert copy_row(app) == ("verified", str((tmp_path / "store" / "base.img").resolve()), 100)
        assert (tmp_path / "store" / "base.img").read_bytes() == data and not partial.exists()
        assert "(will resume)" in caplog.text
        assert re.search(r"replicating base from peer: \d+% \(\d+/4 MiB\)", caplog.text)
    finally:
        app.close()
        await runner.cleanup()


async def test_shared_store_records_the_peer_copy_without_copying(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    image = tmp_path / "shared" / "base.img"
    image.write_bytes(os.urandom(1 << 20))
    app = App(NodeConfig(name="me", data_dir=str(tmp_path / "me")), f"sqlite:///{tmp_path / 'farm.sqlite'}")
    try:
        seed(app, 1, image)
        with session_scope(app.sessions()) as s:
            inventory = MemoryInventory(load_snapshot(s))
        rep = Replicator(inventory, app.sessions, "me", tmp_path / "shared", True, 5.0)
        async with aiohttp.ClientSession() as http:
            await rep.round(http)
        assert copy_row(app) == ("verified", str(image.resolve()), 100)
        assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["base.img"]
    finally:
        app.close()


# -- real nodes ------------------------------------------------------------

def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def status(db_url: str, name: str) -> dict[str, dict[str, object]]:
    return {r["server"]: r for r in json.loads(admin(db_url, "vdisk", "status", name, "--json"))}


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 20.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def peer_get(node: RunningNode, name: str, secret: bytes | None, rng: str | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"{node.url}/peer/vdisk/{name}")
    if secret is not None:
        req.add_header(AUTH_HEADER, peer_auth(secret, name, time.time()))
    if rng:
        req.add_header("Range", rng)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, b"", {}


def farm_secret(db_url: str) -> bytes:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        value = conn.execute(text("select value from farm_settings where key = 'export_token_secret'")).scalar_one()
    engine.dispose()
    return bytes.fromhex(value)


def test_local_stores_sync_reject_corruption_and_resync_after_update(db_url: str, tmp_path: Path) -> None:
    if db_url.startswith("postgresql"):
        admin(db_url, "db", "upgrade")
    good, bad, v2 = tmp_path / "good.img", tmp_path / "bad.img", tmp_path / "v2.img"
    for path, mib in ((good, 24), (bad, 4), (v2, 16)):
        path.write_bytes(os.urandom(mib << 20))
    n1 = start_node(tmp_path, "n1", db_url)
    n2: RunningNode | None = None
    try:
        admin(db_url, "vdisk", "add", "good", "--file", str(good), config=n1.config)
        admin(db_url, "vdisk", "add", "bad", "--file", str(bad), config=n1.config)
        with (tmp_path / "n1" / "store" / "bad.img").open("r+b") as f:  # n1 still claims it verified
            f.seek(1 << 20)
            f.write(b"\0" * 512)
        n2 = start_node(tmp_path, "n2", db_url)
        store2 = tmp_path / "n2" / "store"
        took = wait_for("n2's copy of good", lambda: status(db_url, "good")["n2"]["state"] == "verified")
        print(f"good (24 MiB) verified on n2 after {took:.1f}s")
        assert sha256(store2 / "good.img") == sha256(good)
        assert {r["state"] for r in status(db_url, "good").values()} == {"verified"}
        table = admin(db_url, "vdisk", "status")
        assert "copying" not in table and table.count("verified") >= 2

        secret = farm_secret(db_url)
        assert peer_get(n1, "good", None)[0] == 403
        assert peer_get(n1, "nope", secret)[0] == 404
        code, body, headers = peer_get(n1, "good", secret, rng="bytes=1048576-1048675")
        assert code == 206 and body == good.read_bytes()[1 << 20:(1 << 20) + 100]
        assert headers[DIGEST_HEADER] == sha256(good)

        wait_for("n2's digest mismatch on bad", lambda: "DIGEST MISMATCH" in n2.log.read_text())
        assert status(db_url, "bad")["n2"]["state"] == "stale"
        assert not (store2 / "bad.img").exists() and not list(store2.glob(".bad.img.partial*"))

        out = json.loads(admin(db_url, "vdisk", "update", "good", "--file", str(v2), "--json", config=n1.config))
        copies = {c["server"]: c["state"] for c in out["copies"]}
        assert out["digest"] == sha256(v2) and copies == {"n1": "verified", "n2": "stale"}
        took = wait_for("n2 re-synced good", lambda: status(db_url, "good")["n2"]["state"] == "verified")
        print(f"updated good (16 MiB) re-verified on n2 after {took:.1f}s")
        assert sha256(store2 / "good.img") == sha256(v2)
        assert status(db_url, "bad")["n2"]["state"] != "verified"
    finally:
        for node in (n2, n1):
            if node is not None:
                node.stop()
