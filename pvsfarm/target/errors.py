"""Errors of the simulated target."""

from __future__ import annotations

from typing import Any

from pvsfarm.errors import PvsfarmError


class BootFailed(PvsfarmError):
    """A boot step could not complete. ``step`` names it (dhcp, tftp, login, nbd,
    failover, verify); ``report`` is the partial report when the boot driver knew one."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.report: dict[str, Any] | None = None


class StreamLost(PvsfarmError):
    """The NBD connection failed mid-transmission (reset, closed, timed out):
    the target fails over instead of giving up."""
