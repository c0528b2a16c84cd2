from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pvsfarm.errors import Conflict, NotFound, StoreError
from pvsfarm.store import BaseImage, SharedDevice, WriteCache, read_bytes, sha256_file
from pvsfarm.store.device import ZERO_FD
from pvsfarm.store.writecache import HEADER_BYTES
from tests.store.helpers import REPO_ROOT, MakeBase, pattern

BS = 4096
SIZE = 8 * BS + 1024  # the last block is short


@pytest.fixture
def base(make_base: MakeBase):
    with BaseImage(make_base(SIZE)) as image:
        yield image


@pytest.fixture
def cache(base: BaseImage, tmp_path: Path):
    with WriteCache.create(base, tmp_path / "t1.cache", block_size=BS) as wc:
        yield wc


def sources(cache: WriteCache, offset: int, length: int) -> list[str]:
    names = {cache.base.fd: "base", cache.fd: "overlay", ZERO_FD: "zero"}
    return [names[e.fd] for e in cache.read_extents(offset, length)]


# (description, operations, read offset, read length, expected extent sources)
CASES = [
    ("untouched read is one base extent", [], 0, SIZE, ["base"]),
    ("write the very last byte", [("w", SIZE - 1, b"\xff")], SIZE - 2, 2, ["overlay"]),
    ("write the very first byte", [("w", 0, b"\x01")], 0, BS + 1, ["overlay", "base"]),
    ("read spans base|overlay|base", [("w", BS, b"x" * BS)], BS - 10, BS + 20,
     ["base", "overlay", "base"]),
    ("unaligned write across a block boundary", [("w", BS - 3, b"abcdef")], 0, 2 * BS,
     ["overlay"]),
    ("adjacent cached blocks merge", [("w", 0, b"y" * 3 * BS)], 0, SIZE, ["overlay", "base"]),
    ("whole-block zeroes read as an fd=-1 extent", [("z", BS, 2 * BS)], 0, SIZE,
     ["base", "zero", "base"]),
    ("partial zeroes are data", [("z", 10, 100)], 0, BS, ["overlay"]),
    ("trim reads as zeros", [("t", 0, SIZE)], 0, SIZE, ["zero"]),
    ("zeroing the short last block", [("z", 8 * BS, 1024)], 8 * BS - 1, 1025, ["base", "zero"]),
    ("rewrite flips slot, still one extent per run", [("w", 0, b"a" * BS), ("w", 0, b"b" * BS)],
     0, BS, ["overlay"]),
]


@pytest.mark.parametrize("ops,offset,length,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_edge_cases(cache: WriteCache, ops, offset: int, length: int, expected) -> None:
    model = bytearray(pattern(SIZE))
    for kind, at, arg in ops:
        if kind == "w":
            cache.pwrite(at, arg, fua=False)
            model[at : at + len(arg)] = arg
        else:
            (cache.write_zeroes if kind == "z" else cache.trim)(at, arg)
            model[at : at + arg] = bytes(arg)
    assert sources(cache, offset, length) == expected
    extents = cache.read_extents(offset, length)
    assert sum(e.length for e in extents) == length and all(e.length for e in extents)
    assert read_bytes(cache, offset, length) == model[offset : offset + length]
    assert read_bytes(cache, 0, SIZE) == model


def test_zero_length_requests(cache: WriteCache) -> None:
    assert cache.read_extents(SIZE, 0) == []
    cache.pwrite(SIZE, b"", fua=False)
    cache.write_zeroes(0, 0)
    assert cache.cached_blocks() == 0


@pytest.mark.parametrize("offset,length", [(-1, 1), (SIZE, 1), (SIZE - 1, 2)])
def test_out_of_range(cache: WriteCache, offset: int, length: int) -> None:
    with pytest.raises(StoreError, match="outside"):
        cache.read_extents(offset, length)
    with pytest.raises(StoreError, match="outside"):
        cache.pwrite(offset, b"x" * max(length, 0), fua=False)


def test_base_bytes_and_mtime_unchanged_after_writes(make_base: MakeBase, tmp_path: Path) -> None:
    path = make_base(1 << 20)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = (sha256_file(path), os.stat(path).st_mtime_ns)
    rng = random.Random(7)
    with WriteCache.create(path, tmp_path / "c", block_size=BS) as wc:
        for _ in range(200):
            offset = rng.randrange(0, (1 << 20) - 5000)
            wc.pwrite(offset, rng.randbytes(rng.randrange(1, 5000)), fua=rng.random() < 0.1)
        wc.write_zeroes(0, 1 << 19)
        wc.trim(12345, 99999)
        wc.flush()
    assert (sha256_file(path), os.stat(path).st_mtime_ns) == before


def test_reopen_restores_state(base: BaseImage, tmp_path: Path) -> None:
    path = tmp_path / "c"
    with WriteCache.create(base, path, block_size=BS) as wc:
        wc.pwrite(100, b"persist", fua=False)
        wc.write_zeroes(2 * BS, BS)
        before = read_bytes(wc, 0, SIZE)
    with WriteCache.open_existing(base, path) as wc:
        assert read_bytes(wc, 0, SIZE) == before
        assert sources(wc, 0, SIZE) == ["overlay", "base", "zero", "base"]


def test_create_discards_the_old_cache(base: BaseImage, tmp_path: Path) -> None:
    path = tmp_path / "c"
    with WriteCache.create(base, path, block_size=BS) as wc:
        wc.pwrite(0, b"old", fua=False)
    with WriteCache.create(base, path, block_size=BS) as wc:
        assert sources(wc, 0, SIZE) == ["base"] and wc.cached_blocks() == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_header_mismatches_are_rejected(make_base: MakeBase, tmp_path: Path) -> None:
    cache_path = tmp_path / "c"
    with BaseImage(make_base(SIZE)) as base:
        WriteCache.create(base, cache_path, block_size=BS).close()
        with pytest.raises(StoreError, match="another base"):
            WriteCache.open_existing(base, cache_path, base_id="sha256:other")
    with BaseImage(make_base(SIZE, name="other.vhd", seed=2)) as other:
        with pytest.raises(StoreError, match="another base"):
            WriteCache.open_existing(other, cache_path)
    with BaseImage(make_base(SIZE + 512, name="bigger.vhd")) as bigger:
        with pytest.raises(StoreError, match="base of"):
            WriteCache.open_existing(bigger, cache_path)


def test_explicit_base_id_round_trips(base: BaseImage, tmp_path: Path) -> None:
    WriteCache.create(base, tmp_path / "c", base_id="sha256:abc", block_size=BS).close()
    WriteCache.open_existing(base, tmp_path / "c", base_id="sha256:abc").close()
    with pytest.raises(StoreError, match="base id longer"):
        WriteCache.create(base, tmp_path / "d", base_id="x" * 200)


@pytest.mark.parametrize("damage,match", [
    (lambda raw: b"NOTCACHE" + raw[8:], "not a pvsfarm write cache"),
    (lambda raw: raw[:20] + bytes([raw[20] ^ 1]) + raw[21:], "checksum"),
    (lambda raw: raw[:HEADER_BYTES] + b"\x07" + raw[HEADER_BYTES + 1 :], "corrupt block map"),
    (lambda raw: raw[: HEADER_BYTES * 2], "truncated"),
    (lambda raw: b"", "truncated header"),
])
def test_damaged_cache_is_rejected(base: BaseImage, tmp_path: Path, damage, match: str) -> None:
    path = tmp_path / "c"
    WriteCache.create(base, path, block_size=BS).close()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StoreError, match=match):
        WriteCache.open_existing(base, path)


def test_missing_cache_and_bad_block_size(base: BaseImage, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        WriteCache.open_existing(base, tmp_path / "absent")
    with pytest.raises(StoreError, match="power of two"):
        WriteCache.create(base, tmp_path / "c", block_size=3000)


def test_second_opener_conflicts(base: BaseImage, tmp_path: Path) -> None:
    with WriteCache.create(base, tmp_path / "c", block_size=BS):
        with pytest.raises(Conflict, match="already open"):
            WriteCache.open_existing(base, tmp_path / "c")


def test_overlay_is_sparse(make_base: MakeBase, tmp_path: Path) -> None:
    path = make_base(8 << 20)
    with WriteCache.create(path, tmp_path / "c") as wc:
        wc.pwrite(1 << 20, b"z" * 4096, fua=False)
        assert os.stat(tmp_path / "c").st_blocks * 512 < 1 << 20


def test_half_cached_image_extent_count(make_base: MakeBase, tmp_path: Path) -> None:
    """Every other 64 KiB block cached: a 1 MiB read is 16 extents (the worst
    case); with the first half cached it is 2."""
    path = make_base(4 << 20)
    with WriteCache.create(path, tmp_path / "c") as wc:
        bs = wc.block_size
        for block in range(0, 64, 2):
            wc.pwrite(block * bs, b"d" * bs, fua=False)
        assert len(wc.read_extents(0, 1 << 20)) == 16
    with WriteCache.create(path, tmp_path / "c") as wc:
        wc.pwrite(0, b"d" * (2 << 20), fua=False)
        assert len(wc.read_extents(0, 4 << 20)) == 2


def test_shared_device_closes_with_the_last_handle(base: BaseImage, tmp_path: Path) -> None:
    shared = SharedDevice(WriteCache.create(base, tmp_path / "c", block_size=BS))
    one, two = shared.handle(), shared.handle()
    one.pwrite(0, b"seen by both", fua=False)
    assert read_bytes(two, 0, 12) == b"seen by both"
    one.close()
    one.close()
    two.flush()
    two.close()
    with pytest.raises(StoreError):
        shared.handle()
    WriteCache.open_existing(base, tmp_path / "c").close()  # lock released


WRITER = """
import sys
from pvsfarm.store import WriteCache
cache = WriteCache.create(sys.argv[1], sys.argv[2], block_size=4096)
k = 0
while True:
    offset, data = {plan}(k)
    cache.pwrite(offset, data, fua=False)
    print(k, flush=True)
    k += 1
"""


def plan(k: int) -> tuple[int, bytes]:
    """The k-th write of the kill -9 test: unaligned, 1.5 blocks, distinct fill."""
    return (k * 7919 * 13) % (SIZE - 6200), bytes([k % 251 + 1]) * 6200


def test_kill_9_mid_stream_keeps_acknowledged_writes(make_base: MakeBase, tmp_path: Path) -> None:
    base_path, cache_path = make_base(SIZE), tmp_path / "c"
    source = WRITER.replace("{plan}", "plan_").replace(
        "import sys", "import sys\n" + _plan_source(), 1)
    child = subprocess.Popen(
        [sys.executable, "-c", source, str(base_path), str(cache_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.stdout is not None
    for _ in range(300):
        child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    acked = 300 + len(child.stdout.read().split())
    child.wait()
    before, after = bytearray(pattern(SIZE)), None
    for k in range(acked):
        offset, data = plan(k)
        before[offset : offset + len(data)] = data
    after = bytearray(before)
    offset, data = plan(acked)  # the write that may have been in flight
    after[offset : offset + len(data)] = data
    with WriteCache.open_existing(base_path, cache_path) as wc:
        seen = read_bytes(wc, 0, SIZE)
    for start in range(0, SIZE, BS):
        block = seen[start : start + BS]
        assert block in (before[start : start + BS], after[start : start + BS]), start


def _plan_source() -> str:
    return (
        f"SIZE = {SIZE}\n"
        "def plan_(k):\n"
        "    return (k * 7919 * 13) % (SIZE - 6200), bytes([k % 251 + 1]) * 6200\n"
    )


ATTACHED_WRITER = """
import sys
from pvsfarm.store import BaseImage, WriteCache
base, cache, who, dev, ino, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
with BaseImage(base) as image:
    wc = WriteCache.attach(image, cache, base_id=sys.argv[7], ident=(dev, ino))
    print("ready", flush=True)
    sys.stdin.readline()
    for k in range(rounds):
        for block in range(4):
            off = block * 4096 + (k * 2 + who) * 8
            wc.pwrite(off, bytes([who + 1]) * 8, False)
    wc.close()
"""


def test_two_processes_partial_writes_to_one_block_lose_nothing(make_base: MakeBase, tmp_path: Path) -> None:
    """Two attached instances in two processes read-modify-write the same 4 blocks
    at disjoint 8-byte pieces, as fast as they can: every piece must survive (the
    OFD block lock serializes each block's read-modify-write across processes)."""
    base_path, cache_path, rounds = make_base(SIZE), tmp_path / "c", 200
    with WriteCache.create(base_path, cache_path, block_size=BS) as owner:
        st = os.fstat(owner.fd)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        args = [str(base_path), str(cache_path)]
        children = [
            subprocess.Popen([sys.executable, "-c", ATTACHED_WRITER, *args, str(who), str(st.st_dev),
                              str(st.st_ino), str(rounds), owner.header.base_id],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for who in (0, 1)
        ]
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:  # start both at once
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            assert child.wait(60) == 0
        expected = bytearray(pattern(SIZE))
        for k in range(rounds):
            for block in range(4):
                for who in (0, 1):
                    off = block * BS + (k * 2 + who) * 8
                    expected[off : off + 8] = bytes([who + 1]) * 8
        assert read_bytes(owner, 0, SIZE) == bytes(expected)


def test_attach_refuses_a_replaced_file(base: BaseImage, tmp_path: Path) -> None:
    """A worker re-opening by path must not reach a file its node does not hold
    (e.g. the cache was taken over and renamed over since)."""
    with WriteCache.create(base, tmp_path / "c", block_size=BS) as owner:
        st = os.fstat(owner.fd)
        ident = (st.st_dev, st.st_ino)
        with WriteCache.attach(base, tmp_path / "c", base_id=owner.header.base_id, ident=ident) as other:
            other.pwrite(10, b"x" * 5000, False)
            assert read_bytes(owner, 10, 5000) == b"x" * 5000
        os.rename(tmp_path / "c", tmp_path / "old")
        (tmp_path / "c").write_bytes((tmp_path / "old").read_bytes())
        with pytest.raises(StoreError, match="replaced"):
            WriteCache.attach(base, tmp_path / "c", base_id=owner.header.base_id, ident=ident)
