"""The session journal's batch flush: idempotent replays, moves, I/O and ends."""

from __future__ import annotations

from sqlalchemy import select

from pvsfarm.addr import MacAddress
from pvsfarm.admin import devices, farm, vdisks
from pvsfarm.db.engine import make_engine, session_scope
from pvsfarm.db.migrate import upgrade
from pvsfarm.db.models import Server, StreamSession
from pvsfarm.streaming.journal import Journal, live_load, write_batch
from pvsfarm.views import BootMethod, CacheType, VDiskMode

from sqlalchemy.orm import sessionmaker


def farm_with(db_url: str, tmp_path, servers: tuple[str, ...], macs: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """A migrated database with ``servers``, vDisk "base" on the first, and one device per MAC."""
    engine = make_engine(db_url)
    upgrade(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    image = tmp_path / "b.img"
    image.write_bytes(b"\0" * 4096)
    with session_scope(factory) as s:
        first = [farm.ensure_server(s, name, f"10.0.0.{i}", http_port=1, nbd_port=2, tftp_port=3)
                 for i, name in enumerate(servers, 1)][0]
        vdisks.add_vdisk(s, "t", first, "base", image, tmp_path, mode=VDiskMode.STANDARD,
                         cache_type=CacheType.SERVER, boot_method=BootMethod.SANBOOT, copy=False)
        for i, mac in enumerate(macs, 1):
            devices.add_device(s, "t", devices.make_spec(mac, f"d{i}", None, None, "base"))
    return engine, factory


def test_flush_is_idempotent_and_applies_io_moves_and_ends(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine, factory = farm_with(db_url, tmp_path, ("s1", "s2"), ("52:54:00:00:00:01",))
    mac = str(MacAddress.parse("52:54:00:00:00:01"))
    j = Journal()
    j.open("sid1", mac, "base", "s1", 1000.0)
    batch = j.take()
    with session_scope(factory) as s:
        write_batch(s, batch)
    with session_scope(factory) as s:
        write_batch(s, batch)  # replayed: no duplicate, no error
        assert live_load(s, "s1") == 1
    j.record_io("sid1", 4096, 512, 1001.0)
    j.move("sid1", "s2")
    with session_scope(factory) as s:
        write_batch(s, j.take())
        row = s.scalar(select(StreamSession))
        assert (row.bytes_read, row.bytes_written) == (4096, 512)
        assert live_load(s, "s2") == 1 and live_load(s, "s1") == 0
    j.end("sid1", 1002.0)
    with session_scope(factory) as s:
        write_batch(s, j.take())
        assert live_load(s, "s2") == 0
    engine.dispose()


def test_flush_ends_earlier_sessions_and_skips_unknown_rows(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Both write paths (PostgreSQL arrays, portable bulk statements) give the same rows."""
    from pvsfarm.db.models import aware

    d1, d2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
    engine, factory = farm_with(db_url, tmp_path, ("s1",), (d1, d2))
    j = Journal()
    j.open("a", d1, "base", "s1", 1000.0)
    j.open("b", d2, "base", "s1", 1001.0)
    j.open("c", d1, "base", "s1", 1002.5)  # d1 again in the same batch: "a" ends here
    j.open("x", "52:54:00:00:00:09", "base", "s1", 1003.0)  # unknown device: dropped
    j.open("y", d2, "nope", "s1", 1003.0)  # unknown vDisk: dropped, ends nothing
    j.record_io("b", 10, 20, 1004.25)
    with session_scope(factory) as s:
        write_batch(s, j.take())
    j.open("d", d2, "base", "s1", 1010.0)  # ends "b" (written in an earlier batch) at this login
    j.record_io("b", 1, 2, 1005.0)
    second = j.take()
    for _ in range(2):  # the second time is a replay: nothing changes
        with session_scope(factory) as s:
            write_batch(s, second)

    def epoch(value):  # type: ignore[no-untyped-def]
        stamp = aware(value)
        return round(stamp.timestamp(), 3) if stamp is not None else None

    with session_scope(factory) as s:
        rows = {r.token: (epoch(r.started_at), epoch(r.ended_at), r.bytes_read, r.bytes_written, epoch(r.last_io_at))
                for r in s.scalars(select(StreamSession))}
    engine.dispose()
    assert rows == {
        "a": (1000.0, 1002.5, 0, 0, None),
        "b": (1001.0, 1010.0, 12, 24, 1005.0),
        "c": (1002.5, None, 0, 0, None),
        "d": (1010.0, None, 0, 0, None),
    }


def test_a_failover_records_a_session_whose_open_died_with_its_node(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A node killed before its journal flushed a login: the survivor that resumes the session
    inserts it (and ends the device's earlier session), or the database never shows the target
    streaming from anywhere (e2e: its row stuck on the dead node)."""
    import time

    from pvsfarm.db.snapshot import MemoryInventory
    from pvsfarm.streaming.login import LoginService
    from tests.streaming.test_login_farm import snapshot

    mac = MacAddress.parse("52:54:00:5c:00:01")  # test_login_farm's device: vDisk "base" on n1 and n2
    engine, factory = farm_with(db_url, tmp_path, ("n1", "n2"), (str(mac),))
    now = time.time()
    inventory = MemoryInventory(snapshot({"n1": now, "n2": now}))
    first, survivor = (LoginService(inventory, lambda: b"k" * 32, Journal(), dead_after_s=5.0) for _ in range(2))
    sanboot = first.login(mac, now)  # flushed
    with session_scope(factory) as s:
        write_batch(s, first.journal.take())
    agent = first.login(mac, now + 1)  # the node dies before it flushes this login
    first.journal.take()
    moved = survivor.login(mac, now + 2, resume=agent.token, exclude=frozenset({agent.server.name}))
    assert moved.resumed and moved.server.name != agent.server.name
    survivor.journal.record_io(agent.grant.session_id, 4096, 0, now + 3)
    with session_scope(factory) as s:
        write_batch(s, survivor.journal.take())
    with session_scope(factory) as s:
        names = dict(s.execute(select(Server.id, Server.name)).all())
        rows = {r.token: (names[r.server_id], r.ended_at is None, r.bytes_read) for r in s.scalars(select(StreamSession))}
    engine.dispose()
    assert rows == {sanboot.grant.session_id: (sanboot.server.name, False, 0),
                    agent.grant.session_id: (moved.server.name, True, 4096)}


def test_a_session_opened_twice_in_one_batch_is_inserted_once(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A session that failed over within one flush interval of its login, back to a node whose
    journal still holds its first open: one row, on the server it moved to."""
    mac = "52:54:00:00:00:01"
    engine, factory = farm_with(db_url, tmp_path, ("s1", "s2"), (mac,))
    j = Journal()
    j.open("a", mac, "base", "s2", 1000.0)
    j.open("a", mac, "base", "s1", 1000.0)  # resumed on s1 ...
    j.move("a", "s1")
    j.open("a", mac, "base", "s2", 1000.0)  # ... and back on s2
    j.move("a", "s2")
    with session_scope(factory) as s:
        write_batch(s, j.take())
        assert (live_load(s, "s1"), live_load(s, "s2")) == (0, 1)
        assert len(s.scalars(select(StreamSession)).all()) == 1
    engine.dispose()
