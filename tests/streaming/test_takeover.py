"""A hung node keeps its lock on a session's write cache: the next node fences it off."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pvsfarm.db.snapshot import MemoryInventory, Snapshot
from pvsfarm.errors import Conflict
from pvsfarm.store import WriteCache, read_bytes
from pvsfarm.streaming.exports import Exports, _set_owner, copy_sparse
from pvsfarm.streaming.journal import Journal
from pvsfarm.views import BootMethod, CacheType, ServerState, ServerView, VDiskMode, VDiskView

VD = VDiskView("base", 1 << 20, VDiskMode.STANDARD, CacheType.SERVER, "sha256:x", BootMethod.SANBOOT)


def exports(tmp: Path, holder_age_s: float) -> Exports:
    old = ServerView("old", "10.0.0.1", 1, 2, 3, ServerState.UP, time.time() - holder_age_s, 0)
    inv = MemoryInventory(Snapshot(servers=(old,)))
    return Exports(inv, lambda: b"k" * 32, "new", tmp / "cache", Journal(), time.time, dead_after_s=5.0)


@pytest.fixture
def held(tmp_path: Path):  # type: ignore[no-untyped-def]
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(1 << 20))
    cache = tmp_path / "c.cow"
    wc = WriteCache.create(base, cache, base_id="sha256:x")
    wc.pwrite(4096, b"A" * 8192, False)
    _set_owner(cache, "old")
    yield base, cache, wc
    wc.close()


def test_refused_while_the_holder_is_live(held, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, cache, _ = held
    with pytest.raises(Conflict, match="live server 'old'"):
        exports(tmp_path, holder_age_s=1)._take_over(cache, base, VD)


def test_taken_over_from_a_dead_holder_and_fenced(held, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, cache, hung = held
    taken = exports(tmp_path, holder_age_s=60)._take_over(cache, base, VD)
    try:
        assert read_bytes(taken, 4096, 8192) == b"A" * 8192  # acknowledged writes kept
        hung.pwrite(0, b"Z" * 4096, False)  # the hung process wakes and writes: fenced off
        assert read_bytes(taken, 0, 4096) == base.read_bytes()[:4096]
    finally:
        taken.close()


def test_copy_sparse_keeps_holes_and_bytes(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    with src.open("wb") as f:
        f.seek(10 << 20)
        f.write(b"data")
        f.seek(30 << 20)
        f.write(b"end")
    copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < 1 << 20
