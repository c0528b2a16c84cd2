"""Back-off for bounded busy polling (TFTP transfers, NBD worker connections).

A spin that timed out means the peer answers too slowly for spinning to pay (a
client across a real network, or a quiet one): skip the next 1, 2, 4 ...
`MAX_BACKOFF` chances to spin, doubling while spins keep timing out; a spin that
catches its input starts over.
"""

from __future__ import annotations

MAX_BACKOFF = 64
"""Most chances to spin skipped after spins that timed out in a row."""


class SpinBackoff:
    """The back-off state of one peer."""

    __slots__ = ("_skip", "_next")

    def __init__(self) -> None:
        self._skip = 0  # chances still to skip
        self._next = 1  # chances to skip after the next time-out

    def skipping(self) -> bool:
        """Whether to skip this chance to spin (counts it)."""
        if self._skip:
            self._skip -= 1
            return True
        return False

    def timed_out(self) -> None:
        self._skip, self._next = self._next, min(2 * self._next, MAX_BACKOFF)

    def caught(self) -> None:
        self._skip, self._next = 0, 1
