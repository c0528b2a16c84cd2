"""ReadSession driven by bytes and a number for the clock: no sockets, no sleeps."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvsfarm.bootstrap.tftp.run_cache import RunCache
from pvsfarm.bootstrap.tftp.session import (
    MessageIgnored,
    ReadSession,
    SessionLimits,
    TransferAborted,
    TransferComplete,
    TransferTimedOut,
    negotiate,
    split_run,
)
from pvsfarm.bootstrap.tftp.wire import Ack, Data, Error, ErrorCode, OptionAck, ReadRequest, parse, serialize
from pvsfarm.errors import StoreError

LIMITS = SessionLimits(timeout_s=1.0, max_retries=5)


def start(content: bytes, *opts: tuple[str, str], limits: SessionLimits = LIMITS) -> ReadSession:
    req = ReadRequest("f", options=tuple(opts))
    return ReadSession.start(req, len(content), lambda off, n: content[off : off + n], limits)


def out(s: ReadSession, now: float = 0.0) -> list:
    return [parse(d) for d in s.datagrams_to_send(now)]


def ack(n: int) -> bytes:
    return serialize(Ack(n))


def test_lock_step_without_options() -> None:
    content = os.urandom(1300)
    s = start(content)
    assert out(s) == [Data(1, content[:512])]
    assert s.receive(ack(1), 0.1) == []
    assert out(s, 0.1) == [Data(2, content[512:1024])]
    s.receive(ack(2), 0.2)
    assert out(s, 0.2) == [Data(3, content[1024:])]
    assert s.receive(ack(3), 0.3) == [TransferComplete(3, 1300)]
    assert s.finished and s.next_deadline() is None and out(s) == []


def test_exact_multiple_ends_with_empty_block() -> None:
    s = start(b"x" * 1024)
    for n in (1, 2):
        assert len(out(s)[0].payload) == 512
        s.receive(ack(n), 0)
    assert out(s) == [Data(3, b"")]
    assert s.receive(ack(3), 0) == [TransferComplete(3, 1024)]


def test_empty_file() -> None:
    s = start(b"", ("tsize", "0"))
    assert out(s) == [OptionAck((("tsize", "0"),))]
    s.receive(ack(0), 0)
    assert out(s) == [Data(1, b"")]
    assert s.receive(ack(1), 0) == [TransferComplete(1, 0)]


def test_oack_then_data() -> None:
    content = os.urandom(3000)
    s = start(content, ("blksize", "1468"), ("tsize", "0"), ("foo", "bar"))
    assert out(s) == [OptionAck((("blksize", "1468"), ("tsize", "3000")))]
    assert s.receive(ack(1), 0) == [MessageIgnored("ACK 1 while waiting for ACK 0 of the OACK")]
    assert out(s) == []
    s.receive(ack(0), 0)
    assert out(s) == [Data(1, content[:1468])]


def test_blksize_bounds() -> None:
    assert negotiate((("blksize", "7"),), 10, LIMITS).oack is None  # declined: RFC 2348 minimum is 8
    assert negotiate((("blksize", "7"),), 10, LIMITS).blksize == 512
    big = negotiate((("blksize", "70000"),), 10, LIMITS)
    assert big.blksize == 65464 and big.oack == OptionAck((("blksize", "65464"),))
    capped = negotiate((("blksize", "9000"),), 10, SessionLimits(max_blksize=1468))
    assert capped.blksize == 1468
    assert negotiate((("blksize", "8"),), 10, LIMITS).blksize == 8


def test_timeout_and_windowsize_bounds() -> None:
    n = negotiate((("timeout", "0"), ("windowsize", "0")), 1, LIMITS)
    assert n.oack is None and n.timeout_s == 1.0 and n.windowsize == 1
    n = negotiate((("timeout", "256"), ("windowsize", "65536")), 1, LIMITS)
    assert n.oack is None
    n = negotiate((("timeout", "3"), ("windowsize", "8")), 1, LIMITS)
    assert n.timeout_s == 3.0 and n.windowsize == 8
    assert n.oack == OptionAck((("timeout", "3"), ("windowsize", "8")))
    assert negotiate((("windowsize", "65535"),), 1, LIMITS).windowsize == LIMITS.max_windowsize
    # a window of large blocks is lowered to max_window_bytes, whatever the options' order
    for opts in ((("windowsize", "64"), ("blksize", "65464")), (("blksize", "65464"), ("windowsize", "64"))):
        n = negotiate(opts, 1, LIMITS)
        assert n.blksize == 65464 and n.windowsize == 4 == LIMITS.max_window_bytes // 65464
        assert n.oack is not None and ("windowsize", "4") in n.oack.options
    assert negotiate((("windowsize", "64"), ("blksize", "1468")), 1, LIMITS).windowsize == 64
    # duplicates: first one wins
    assert negotiate((("blksize", "1024"), ("blksize", "2048")), 1, LIMITS).blksize == 1024


def test_malformed_option_value_is_error_8() -> None:
    for bad in ("abc", "", "-1", "1e3", "١٢"):
        s = start(b"data", ("blksize", bad))
        assert s.finished
        [err] = out(s)
        assert isinstance(err, Error) and err.code == ErrorCode.OPTION_NEGOTIATION


def test_retransmit_after_timeout_then_give_up() -> None:
    s = start(b"a" * 100, limits=SessionLimits(timeout_s=2.0, max_retries=3))
    first = out(s, 10.0)
    assert s.next_deadline() == 12.0
    assert s.handle_timer(11.9) == [] and out(s, 11.9) == []
    for k in range(3):
        now = s.next_deadline()
        assert s.handle_timer(now) == []
        assert out(s, now) == first  # same block again
        assert s.next_deadline() == now + 2.0
    assert s.handle_timer(s.next_deadline()) == [TransferTimedOut(3, 0)]
    assert s.finished and s.next_deadline() is None and out(s) == []


def test_negotiated_timeout_used() -> None:
    s = start(b"a", ("timeout", "5"))
    out(s, 100.0)
    assert s.next_deadline() == 105.0


def test_progress_resets_retries() -> None:
    s = start(b"a" * 2000, limits=SessionLimits(timeout_s=1.0, max_retries=1))
    out(s, 0)
    s.handle_timer(1.0)
    out(s, 1.0)
    s.receive(ack(1), 1.5)
    out(s, 1.5)
    s.handle_timer(2.5)
    assert out(s, 2.5) == [Data(2, b"a" * 512)]
    assert not s.finished


def test_ack_for_block_never_sent_is_ignored() -> None:
    s = start(b"a" * 5000)
    out(s)
    events = s.receive(ack(7), 0)
    assert isinstance(events[0], MessageIgnored) and out(s) == []
    s.receive(ack(1), 0)
    assert [m.block for m in out(s)] == [2]


def test_duplicate_acks_send_nothing() -> None:
    s = start(b"a" * 5000)
    out(s)
    s.receive(ack(1), 0)
    assert [m.block for m in out(s)] == [2]
    for _ in range(5):  # sorcerer's apprentice: the late duplicate must not trigger DATA 2 again
        assert isinstance(s.receive(ack(1), 0)[0], MessageIgnored)
        assert out(s) == []


def test_windowsize_8_flow() -> None:
    content = os.urandom(512 * 20 + 7)
    s = start(content, ("windowsize", "8"))
    assert out(s) == [OptionAck((("windowsize", "8"),))]
    s.receive(ack(0), 0)
    assert [m.block for m in out(s)] == list(range(1, 9))
    s.receive(ack(8), 0)
    assert [m.block for m in out(s)] == list(range(9, 17))
    s.receive(ack(12), 0)  # 13 was lost: the next window starts after 12 (RFC 7440)
    assert [m.block for m in out(s)] == list(range(13, 21))
    s.handle_timer(s.next_deadline())  # timeout: the whole outstanding window again
    assert [m.block for m in out(s, 5)] == list(range(13, 21))
    s.receive(ack(20), 5)
    assert out(s, 5) == [Data(21, content[512 * 20 :])]
    assert s.receive(ack(21), 5) == [TransferComplete(21, len(content))]


def test_rollover_past_65535_blocks() -> None:
    blocks = 65536 + 100
    content = bytes(range(256)) * (blocks * 8 // 256) + b"tail"
    s = start(content, ("blksize", "8"), ("windowsize", "64"))
    out(s)
    s.receive(ack(0), 0)
    got, wire_numbers, expect = bytearray(), [], 1
    while not s.finished:
        for m in out(s):
            assert m.block == expect & 0xFFFF
            wire_numbers.append(m.block)
            got += m.payload
            expect += 1
        s.receive(ack((expect - 1) & 0xFFFF), 0)
    assert bytes(got) == content
    assert wire_numbers[65534:65537] == [65535, 0, 1]


def test_client_error_aborts_and_unexpected_opcode_is_error_4() -> None:
    s = start(b"abc", ("blksize", "1024"))
    out(s)
    assert s.receive(serialize(Error(ErrorCode.OPTION_NEGOTIATION, "no")), 0) == [TransferAborted(8, "no", sent=False)]
    assert s.finished and out(s) == []
    s = start(b"abc")
    out(s)
    [event] = s.receive(serialize(Data(1, b"x")), 0)
    assert isinstance(event, TransferAborted) and event.code == ErrorCode.ILLEGAL_OPERATION
    assert out(s)[0].code == ErrorCode.ILLEGAL_OPERATION


def test_an_error_cut_short_still_aborts() -> None:
    """The server reads at most 476 octets (`transfer.RECV_BYTES`): a longer
    ERROR arrives without its NUL, and still ends the transfer (the codec
    takes an ERROR without its NUL)."""
    s = start(b"abc")
    out(s)
    cut = serialize(Error(ErrorCode.DISK_FULL, "full " * 200))[:476]
    assert s.receive(cut, 0) == [TransferAborted(ErrorCode.DISK_FULL, ("full " * 200)[:472], sent=False)]
    assert s.finished and out(s) == []
    s = start(b"abc")
    out(s)
    assert isinstance(s.receive(b"\x00\x05\x00", 0)[0], MessageIgnored) and not s.finished  # no code: junk


def test_garbage_is_ignored() -> None:
    s = start(b"abc")
    out(s)
    for junk in (b"", b"\x00", b"\x00\x04", b"\xff" * 40):
        assert isinstance(s.receive(junk, 0)[0], MessageIgnored)
    assert not s.finished and out(s) == []


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 6000), window=st.integers(1, 9), loss=st.floats(0, 0.4), seed=st.integers(0, 2**32))
def test_lossy_channel_always_delivers(size: int, window: int, loss: float, seed: int) -> None:
    """A receiver (RFC 7440: ACK the last in-order block) over a channel that
    loses datagrams both ways always ends with the exact file."""
    rng = random.Random(seed)
    content = rng.randbytes(size)
    s = start(content, ("blksize", "100"), ("windowsize", str(window)), limits=SessionLimits(max_retries=10_000))
    now, got, expect = 0.0, bytearray(), 1
    while not s.finished:
        batch = out(s, now)
        if not batch:
            now = s.next_deadline()
            s.handle_timer(now)
            continue
        arrived = [m for m in batch if rng.random() >= loss]
        for m in arrived:
            if isinstance(m, Data) and m.block == expect & 0xFFFF:
                got += m.payload
                expect += 1
        if arrived and rng.random() >= loss:
            s.receive(ack((expect - 1) & 0xFFFF), now)
    assert bytes(got) == content


def test_file_shrinking_under_us_raises_at_send() -> None:
    s = ReadSession.start(ReadRequest("f"), 2000, lambda off, n: b"x" * min(n, 100), LIMITS)
    with pytest.raises(StoreError):  # a short read must not go out as a short (final) block
        s.datagrams_to_send(0)


def _step(s: ReadSession, datagram: bytes, now: float, fast: bool) -> list[bytes]:
    """Feed one datagram the way the server does (``fast``: `next_run` first)."""
    if fast:
        run = s.next_run(datagram, now)
        if run is not None:
            return split_run(run, s.blksize)
    s.receive(datagram, now)
    return s.datagrams_to_send(now)


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(0, 140_000),
    blksize=st.sampled_from([100, 1468, 9000]),
    window=st.integers(1, 9),
    loss=st.floats(0, 0.3),
    seed=st.integers(0, 2**32),
)
def test_next_run_is_receive_then_datagrams_to_send(
    size: int, blksize: int, window: int, loss: float, seed: int
) -> None:
    """Two sessions fed the same datagrams and clock, one through the fast path:
    the same datagrams out, the same deadlines, the same end; the receiver gets
    the exact file (across read-ahead chunks, resent windows, junk and duplicates)."""
    rng = random.Random(seed)
    content = rng.randbytes(size)
    opts = (("blksize", str(blksize)), ("windowsize", str(window)))
    limits = SessionLimits(max_retries=10_000)
    general, fast = start(content, *opts, limits=limits), start(content, *opts, limits=limits)
    now, got, expect = 0.0, bytearray(), 1
    batch = general.datagrams_to_send(now)
    assert fast.datagrams_to_send(now) == batch
    while not general.finished:
        if not batch:
            now = general.next_deadline()
            general.handle_timer(now)
            fast.handle_timer(now)
            batch = general.datagrams_to_send(now)
            assert fast.datagrams_to_send(now) == batch
            continue
        for m in (parse(d) for d in batch if rng.random() >= loss):
            if isinstance(m, Data) and m.block == expect & 0xFFFF:
                got += m.payload
                expect += 1
        inputs = [ack((expect - 1) & 0xFFFF)] if rng.random() >= loss else []
        if rng.random() < 0.1:
            inputs.insert(0, rng.choice([ack((expect - 2) & 0xFFFF), b"\x00\x04", b"\xff\x00", ack(expect + 50)]))
        if rng.random() < 0.05 and inputs:
            inputs[-1] += b"\x00"  # trailing octet: a valid ACK, for the general path only
        now += 0.001
        batch = []
        for datagram in inputs:
            out_general = _step(general, datagram, now, fast=False)
            assert _step(fast, datagram, now, fast=True) == out_general
            batch += out_general
        assert fast.next_deadline() == general.next_deadline() and fast.finished == general.finished
    assert bytes(got) == content


def test_plan_declines_without_changing_anything() -> None:
    content = os.urandom(4500)
    s = start(content, ("blksize", "1000"), ("windowsize", "2"))
    out(s)
    assert s.plan(ack(0)) is None  # the OACK's ACK: general path
    s.receive(ack(0), 0)
    assert s.plan(ack(2)) is None  # DATA 1-2 not taken out yet
    assert [m.block for m in out(s)] == [1, 2]
    for other in (ack(1), ack(3), ack(0), ack(2) + b"x", b"\x00\x04\x00", serialize(Error(0, "x"))):
        assert s.plan(other) is None  # partial, never sent, duplicate, odd length, ERROR
    assert out(s) == [] and not s.finished
    plan = s.plan(ack(2))
    assert plan is not None and s.plan(ack(2)) == plan  # nothing changes until commit
    runs, acks, first = plan
    windows = [[parse(d) for d in split_run(run, 1000)] for run in runs[first:]]
    assert [[m.block for m in window] for window in windows] == [[3, 4], [5]]  # type: ignore[union-attr]
    assert windows[1] == [Data(5, content[4000:])]
    assert acks[first:] == [ack(4), None]  # the last ACK completes: `receive` reports it
    s.commit(2, 1.0)  # both windows sent, ACK 4 came between
    assert s.next_deadline() == 2.0
    assert s.plan(ack(5)) is None
    assert s.receive(ack(5), 1.0) == [TransferComplete(5, 4500)]
    assert s.plan(ack(5)) is None


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 300_000),
    blksize=st.sampled_from([8, 512, 1468, 9000, 65464]),
    window=st.integers(1, 70),
    seed=st.integers(0, 2**32),
)
def test_committing_several_runs_is_stepping_through_their_acks(size: int, blksize: int, window: int, seed: int) -> None:
    """A server sends plan runs while the expected ACKs come back, then commits
    how many it sent (the busy-poll loop); another session is fed the same
    ACKs one at a time.  The same datagrams and deadlines; the receiver gets
    the file; every datagram but the file's last is ``blksize + 4`` octets."""
    rng = random.Random(seed)
    content = rng.randbytes(size)
    opts = (("blksize", str(blksize)), ("windowsize", str(window)))
    fast, general = start(content, *opts), start(content, *opts)
    assert fast.datagrams_to_send(0) == general.datagrams_to_send(0)  # the OACK
    window_datagrams = _step(fast, ack(0), 0, fast=False)
    assert _step(general, ack(0), 0, fast=False) == window_datagrams
    got, now = bytearray(), 0.0
    while True:
        messages = [parse(d) for d in window_datagrams]
        got += b"".join(m.payload for m in messages)  # type: ignore[union-attr]
        reply = ack(messages[-1].block)  # type: ignore[union-attr]
        plan = fast.plan(reply)
        if plan is None:  # the file's last window: its ACK completes the transfer
            assert fast.receive(reply, now) == general.receive(reply, now) == [TransferComplete(fast.total_blocks, size)]
            break
        runs, acks, first = plan
        count = rng.randint(1, len(runs) - first)
        now += 0.5
        for i in range(first, first + count):
            if i > first:  # the client got run i - 1 and ACKs it
                messages = [parse(d) for d in window_datagrams]
                got += b"".join(m.payload for m in messages)  # type: ignore[union-attr]
                reply = ack(messages[-1].block)  # type: ignore[union-attr]
                assert acks[i - 1] == reply
            window_datagrams = split_run(runs[i], blksize)
            assert all(len(d) == blksize + 4 for d in window_datagrams[:-1])
            assert _step(general, reply, now, fast=False) == window_datagrams
        fast.commit(count, now)
        assert fast.next_deadline() == general.next_deadline()
    assert bytes(got) == content and fast.finished and general.finished


def test_file_is_read_ahead_in_chunks() -> None:
    content = os.urandom(200_000)
    reads: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return content[offset : offset + length]

    s = ReadSession.start(ReadRequest("f", options=(("blksize", "1468"),)), len(content), read_at, LIMITS)
    got = bytearray()
    s.datagrams_to_send(0)
    datagrams = _step(s, ack(0), 0, fast=True)
    while not s.finished:
        [m] = [parse(d) for d in datagrams]
        got += m.payload  # type: ignore[union-attr]
        datagrams = _step(s, ack(m.block), 0, fast=True)  # type: ignore[union-attr]
    assert bytes(got) == content
    assert len(reads) == 4 and all(length <= 65536 for _, length in reads)  # not one read per block


def test_run_cache_keeps_the_most_recently_used_within_its_bytes() -> None:
    cache = RunCache(max_bytes=100)
    runs = ([b"x" * 40], [None], [1])
    cache.put("a", runs, 40)
    cache.put("b", runs, 40)
    assert cache.get("a") is runs  # "a" is now the most recent
    cache.put("c", runs, 40)  # 120 > 100: the least recently used ("b") goes
    assert cache.get("b") is None and cache.get("a") is runs and cache.get("c") is runs
    assert cache.size_bytes == 80 and (cache.hits, cache.misses) == (3, 1)
    cache.put("big", runs, 101)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("big") is None and cache.size_bytes == 80
    cache.put("a", runs, 10)  # replaced: counted once
    assert cache.size_bytes == 50


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(0, 200_000),
    blksize=st.sampled_from([8, 512, 1468, 9000]),
    window=st.integers(1, 12),
)
def test_transfers_of_one_file_version_share_its_runs(size: int, blksize: int, window: int) -> None:
    """The second transfer of the same key reads nothing and sends the same
    datagrams as the first; another key (the file changed) reads again."""
    content = os.urandom(size)
    reads: list[int] = []

    def read_at(offset: int, length: int) -> bytes:
        reads.append(offset)
        return content[offset : offset + length]

    cache = RunCache(max_bytes=1 << 30)
    request = ReadRequest("f", options=(("blksize", str(blksize)), ("windowsize", str(window))))

    def transfer(key: object) -> list[bytes]:
        s = ReadSession.start(request, size, read_at, LIMITS, cache, key)
        sent = s.datagrams_to_send(0)  # the OACK
        reply = ack(0)
        while not s.finished:
            window_datagrams = _step(s, reply, 0, fast=True)
            assert window_datagrams or s.finished
            sent += window_datagrams
            if window_datagrams:
                reply = ack(parse(window_datagrams[-1]).block)  # type: ignore[union-attr]
        return sent

    first = transfer(("dev", "ino", 1))
    reads_first = len(reads)
    assert reads_first > 0 or size == 0
    assert transfer(("dev", "ino", 1)) == first and len(reads) == reads_first  # all from the cache
    assert transfer(("dev", "ino", 2)) == first and len(reads) == 2 * reads_first  # another version: read
    got = b"".join(m.payload for m in map(parse, first[1:]))  # type: ignore[union-attr]
    assert got == content
