"""The pure health verdict: fall/rise hysteresis per service, summary, DHCP switch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pvsfarm.health as health
from pvsfarm.health import HealthState, HealthTracker, ProbeResult, dhcp_switch

OK = [ProbeResult("tftp", True), ProbeResult("http", True), ProbeResult("nbd", True)]
TFTP_DOWN = [ProbeResult("tftp", False, "timeout"), ProbeResult("http", True), ProbeResult("nbd", True)]


def run(tracker: HealthTracker, rounds: list[list[ProbeResult]]) -> list[bool]:
    return [tracker.observe(r).healthy for r in rounds]


def test_starts_healthy_and_stays_so_on_passes() -> None:
    tracker = HealthTracker()
    assert tracker.state.healthy and tracker.state.summary() == "ok"
    assert run(tracker, [OK] * 5) == [True] * 5


def test_one_failure_is_noise_two_in_a_row_are_an_outage() -> None:
    tracker = HealthTracker()
    assert run(tracker, [TFTP_DOWN, OK, TFTP_DOWN, OK]) == [True] * 4
    assert run(tracker, [TFTP_DOWN, TFTP_DOWN]) == [True, False]
    assert tracker.state.failing == ("tftp",)
    assert tracker.state.summary() == "tftp down: timeout"


def test_recovery_needs_two_passes_in_a_row() -> None:
    tracker = HealthTracker()
    run(tracker, [TFTP_DOWN, TFTP_DOWN])
    assert run(tracker, [OK, TFTP_DOWN, OK]) == [False, False, False]  # a lucky answer is not enough
    assert run(tracker, [OK]) == [True]


def test_services_are_counted_separately() -> None:
    tracker = HealthTracker()
    nbd_down = [ProbeResult("tftp", True), ProbeResult("nbd", False, "connection refused")]
    # tftp and nbd alternate failing: neither fails twice in a row, so neither is down.
    assert run(tracker, [TFTP_DOWN, nbd_down, TFTP_DOWN, nbd_down]) == [True] * 4
    both = [ProbeResult("tftp", False, "timeout"), ProbeResult("nbd", False, "connection refused")]
    tracker.observe(both)
    state = tracker.observe(both)
    assert state.failing == ("tftp", "nbd")
    assert state.summary() == "tftp down: timeout; nbd down: connection refused"


def test_detail_follows_the_latest_failure() -> None:
    tracker = HealthTracker()
    tracker.observe([ProbeResult("tftp", False, "timeout")])
    tracker.observe([ProbeResult("tftp", False, "timeout")])
    assert tracker.observe([ProbeResult("tftp", False, "error 0: busy")]).summary() == "tftp down: error 0: busy"


@pytest.mark.parametrize(("fall", "rise"), [(1, 1), (3, 2), (2, 4)])
def test_fall_and_rise_are_honoured(fall: int, rise: int) -> None:
    tracker = HealthTracker(fall=fall, rise=rise)
    assert run(tracker, [TFTP_DOWN] * fall) == [True] * (fall - 1) + [False]
    assert run(tracker, [OK] * rise) == [False] * (rise - 1) + [True]


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError):
        HealthTracker(fall=0)


def test_summary_fits_the_column() -> None:
    state = HealthState(("tftp", "http", "nbd"), ("x" * 200, "y" * 200, "z"))
    assert len(state.summary()) == 255 and state.summary().endswith("...")


def test_dhcp_switch_lines() -> None:
    ok, down = HealthState(), HealthState(("tftp",), ("timeout",))
    assert dhcp_switch(ok, down) == "dhcp: paused, tftp unhealthy"
    assert dhcp_switch(down, ok) == "dhcp: resumed"
    assert dhcp_switch(ok, ok) is None
    assert dhcp_switch(down, HealthState(("tftp", "nbd"), ("timeout", "timeout"))) is None


FORBIDDEN = {"asyncio", "socket", "time", "sqlalchemy", "selectors", "uvloop", "aiohttp"}


def test_health_is_pure() -> None:
    tree = ast.parse(Path(health.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & FORBIDDEN
    code = "import sys; b = set(sys.modules); import pvsfarm.health; print(' '.join(set(sys.modules) - b))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert not {m.split(".")[0] for m in loaded} & FORBIDDEN
