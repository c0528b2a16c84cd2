"""Stateful model test of WriteCache against a bytearray (STYLE.md: Tests).

Besides writes, zeroes, trims, reads and flushes at arbitrary offsets, the
machine crashes the cache: a clean crash (the process dies between requests)
and a crash inside a request, injected at each of its steps (part of the block
data written; all data written but no map; part of the map written). After a
crash the cache is reopened from disk with `open_existing`, as a failover node
would, and every block must hold either its old or its new content, never a
mix and never garbage, while every acknowledged request stays visible.

A second instance is attached to the same file (`WriteCache.attach`, as an NBD
worker process does) and every request may go through either, interleaved: both
must always agree with the model (one shared block map, no stale copy).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pvsfarm.store import BaseImage, WriteCache, read_bytes
from tests.store.helpers import pattern

BS = 1024
SIZE = 6 * BS + 512  # short last block

offsets = st.integers(0, SIZE - 1)
STEPS = ["data_partial", "after_data", "map_partial"]


class Crash(Exception):
    """Stands for the process dying at the injection point."""


@st.composite
def spans(draw: st.DrawFn) -> tuple[int, int]:
    offset = draw(offsets)
    length = draw(st.integers(1, min(3 * BS, SIZE - offset)))
    return offset, length


class WriteCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="pvsfarm-wc-"))
        self.cache_path = self.dir / "t.cache"
        base_path = self.dir / "base.vhd"
        base_path.write_bytes(pattern(SIZE, seed=3))
        self.base = BaseImage(base_path)
        self.model = bytearray(pattern(SIZE, seed=3))

    @initialize()
    def create(self) -> None:
        self.cache = WriteCache.create(self.base, self.cache_path, block_size=BS)
        self._attach()

    def _attach(self) -> None:
        st = os.fstat(self.cache.fd)
        self.other = WriteCache.attach(self.base, self.cache_path, base_id=self.cache.header.base_id,
                                       ident=(st.st_dev, st.st_ino))

    def _pick(self, other: bool) -> WriteCache:
        return self.other if other else self.cache

    def teardown(self) -> None:
        if getattr(self, "other", None) is not None:
            self.other.close()
        if getattr(self, "cache", None) is not None:
            self.cache.close()
        self.base.close()
        shutil.rmtree(self.dir)

    @rule(span=spans(), fill=st.binary(min_size=1, max_size=16), fua=st.booleans(), other=st.booleans())
    def write(self, span: tuple[int, int], fill: bytes, fua: bool, other: bool) -> None:
        offset, length = span
        data = (fill * (length // len(fill) + 1))[:length]
        self._pick(other).pwrite(offset, data, fua)
        self.model[offset : offset + length] = data

    @rule(span=spans(), trim=st.booleans(), other=st.booleans())
    def zero(self, span: tuple[int, int], trim: bool, other: bool) -> None:
        offset, length = span
        cache = self._pick(other)
        (cache.trim if trim else cache.write_zeroes)(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule(span=spans(), other=st.booleans())
    def read(self, span: tuple[int, int], other: bool) -> None:
        offset, length = span
        cache = self._pick(other)
        extents = cache.read_extents(offset, length)
        assert sum(e.length for e in extents) == length
        assert all(e.length > 0 for e in extents)
        for a, b in zip(extents, extents[1:]):  # merged: no two could be one
            assert not (a.fd == b.fd and (a.fd == -1 or a.file_offset + a.length == b.file_offset))
        assert read_bytes(cache, offset, length) == self.model[offset : offset + length]

    @rule()
    def flush(self) -> None:
        self.cache.flush()

    @rule()
    def crash_between_requests(self) -> None:
        self._crash_and_reopen()

    @rule(span=spans(), fill=st.binary(min_size=1, max_size=4), step=st.sampled_from(STEPS),
          cut=st.floats(0, 1), zero=st.booleans())
    def crash_inside_request(self, span, fill: bytes, step: str, cut: float, zero: bool) -> None:
        offset, length = span
        data = bytes(length) if zero else (fill * length)[:length]
        new = bytearray(self.model)
        new[offset : offset + length] = data
        self._inject(step, cut)
        try:
            if zero:
                self.cache.write_zeroes(offset, length)
            else:
                self.cache.pwrite(offset, data, fua=False)
        except Crash:
            self._crash_and_reopen(expect_either=new)
        else:  # the step was never reached (e.g. only whole blocks zeroed)
            self._crash_and_reopen()
            self.model = new
            assert read_bytes(self.cache, 0, SIZE) == self.model

    @invariant()
    def matches_model(self) -> None:
        if getattr(self, "cache", None) is not None:
            assert read_bytes(self.cache, 0, SIZE) == self.model
            assert read_bytes(self.other, 0, SIZE) == self.model

    # -- crash machinery ----------------------------------------------------

    def _inject(self, step: str, cut: float) -> None:
        cache = self.cache
        real_data, real_map = cache._write_data, cache._persist_states

        def partial(real, file_offset: int, buf) -> None:
            n = int(len(buf) * cut)
            if n:
                real(file_offset, memoryview(buf)[:n])
            raise Crash

        if step == "data_partial":
            cache._write_data = lambda off, buf: partial(real_data, off, buf)
        elif step == "after_data":
            cache._persist_states = lambda first, states: (_ for _ in ()).throw(Crash)
        else:
            cache._persist_states = lambda first, states: partial(
                lambda off, b: real_map(first + off, b), 0, states)

    def _crash_and_reopen(self, expect_either: bytearray | None = None) -> None:
        os.close(self.cache.fd)  # what the kernel does to a kill -9'd process
        self.other.close()  # its worker dies with the node
        self.cache = self.other = None
        self.cache = WriteCache.open_existing(self.base, self.cache_path)
        self._attach()
        if expect_either is None:
            return
        seen = read_bytes(self.cache, 0, SIZE)
        for start in range(0, SIZE, BS):
            old, new = self.model[start : start + BS], expect_either[start : start + BS]
            assert seen[start : start + BS] in (old, new), f"torn block at {start}"
        self.model = bytearray(seen)


WriteCacheMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWriteCache = WriteCacheMachine.TestCase
