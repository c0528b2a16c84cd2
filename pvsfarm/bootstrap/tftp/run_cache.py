"""DATA laid out by TFTP transfers, shared with the next transfers of the
same file version (a boot storm fetches one loader hundreds of times).
Pure: no I/O, no clock; `session.ReadSession` fills and reads it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["RunCache", "Runs"]

Runs = tuple[list[bytes], list[bytes | None], list[int]]
"""Windows laid out from one block on: the runs, each one's ACK, each one's last block."""


class RunCache:
    """DATA runs laid out by transfers, for the next transfers of the same
    file version, blksize and windowsize (a boot storm fetches one loader
    hundreds of times): a hit costs a dict lookup instead of a read and the
    layout of ~44 datagrams (~17 us with the read, 1468-octet blocks).
    Least recently used entries go first beyond ``max_bytes``; the runs are
    immutable ``bytes``, shared, never copied.  Pure: no I/O, no clock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[Runs, int]] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """Octets of DATA held."""
        return self._bytes

    def get(self, key: Hashable) -> Runs | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, runs: Runs, size_bytes: int) -> None:
        if size_bytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (runs, size_bytes)
        self._bytes += size_bytes
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
