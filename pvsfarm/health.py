"""A node's view of its own health: probe results in, a debounced verdict out.

Pure (no event loop, sockets, clock or database): `probes.py` runs the real
checks against the node's own TFTP, HTTP and NBD listeners and feeds each
round's `ProbeResult`s to `HealthTracker.observe`; the node writes
`HealthState.summary()` to ``servers.health`` and gates DHCP on
`HealthState.healthy`.

Hysteresis, per service (defaults ``fall=2``, ``rise=2``, one round a second):

- a service is *down* after ``fall`` consecutive failed probes. One lost
  loopback datagram or one event-loop stall past the 0.5 s probe timeout is
  not an outage, and flapping DHCP on such noise would move targets for
  nothing; two in a row (~2 s) is still well inside PXE firmware's DHCP
  retransmit schedule (PXE 2.1: 4, 8, 16, 32 s), so a target that
  met the dead node retries and is answered by a healthy peer.
- a down service is *up* again after ``rise`` consecutive passes: a service
  that answers one probe in two must not win targets back on a lucky answer.
  HAProxy's health checks use the same pair (``rise 2``, default ``fall 3``).
- the node starts healthy: its services are started before DHCP is, and a
  freshly started node should not wait ``rise`` rounds before answering.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

SUMMARY_MAX_CHARS = 255
"""``servers.health`` is a String(255) column."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One check of one service: ``ok`` or why not (``detail``: "timeout", ...)."""

    service: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HealthState:
    """The debounced verdict: the services currently considered down, with why."""

    failing: tuple[str, ...] = ()
    """Names of the services that are down, in probe order."""
    details: tuple[str, ...] = ()
    """Last failure reason of each service in ``failing`` (same order)."""

    @property
    def healthy(self) -> bool:
        return not self.failing

    def summary(self) -> str:
        """``"ok"``, or e.g. ``"tftp down: timeout; nbd down: connection refused"``
        (cut to fit ``servers.health``)."""
        if self.healthy:
            return "ok"
        text = "; ".join(f"{s} down: {d}" if d else f"{s} down" for s, d in zip(self.failing, self.details))
        return text if len(text) <= SUMMARY_MAX_CHARS else text[:SUMMARY_MAX_CHARS - 3] + "..."


@dataclass(slots=True)
class _Counter:
    down: bool = False
    streak: int = 0
    """Consecutive results contradicting ``down`` (failures while up, passes while down)."""
    detail: str = ""


@dataclass
class HealthTracker:
    """Per-service fall/rise counters; `observe` one round, read `state`."""

    fall: int = 2
    rise: int = 2
    _services: dict[str, _Counter] = field(default_factory=dict)
    state: HealthState = field(default_factory=HealthState)

    def __post_init__(self) -> None:
        if self.fall < 1 or self.rise < 1:
            raise ValueError("fall and rise must be at least 1")

    def observe(self, results: Iterable[ProbeResult]) -> HealthState:
        """Count one round of probe results; returns (and keeps) the new state."""
        for result in results:
            counter = self._services.setdefault(result.service, _Counter())
            self._count(counter, result)
        down = [(name, c.detail) for name, c in self._services.items() if c.down]
        self.state = HealthState(tuple(n for n, _ in down), tuple(d for _, d in down))
        return self.state

    def _count(self, counter: _Counter, result: ProbeResult) -> None:
        if not result.ok:
            counter.detail = result.detail
        if result.ok != counter.down:  # agrees with the current verdict
            counter.streak = 0
            return
        counter.streak += 1
        if counter.streak >= (self.rise if counter.down else self.fall):
            counter.down, counter.streak = not counter.down, 0


def dhcp_switch(old: HealthState, new: HealthState) -> str | None:
    """The log line when the DHCP gate changes ("dhcp: paused, tftp unhealthy"
    / "dhcp: resumed"), or None when it stays as it was."""
    if old.healthy and not new.healthy:
        return f"dhcp: paused, {', '.join(new.failing)} unhealthy"
    if new.healthy and not old.healthy:
        return "dhcp: resumed"
    return None
