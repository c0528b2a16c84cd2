"""Plain frozen views of farm data, and the one Protocol protocol code reads through.

DHCP, TFTP, the login API and NBD never see ORM instances: they get these views
from an `Inventory` (PostgreSQL, the SQLite offline cache, or in memory for
tests). Enums here are also the column types of the data model.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

from pvsfarm.addr import MacAddress


class VDiskMode(enum.Enum):
    """standard: read-only base shared by many targets, per-target write cache;
    private: one target at a time, read-write on the image itself."""

    STANDARD = "standard"
    PRIVATE = "private"


class CacheType(enum.Enum):
    """Where a standard image's writes go: ``server`` = overlay file in the
    store (moves with the target when the store is shared); ``device-ram`` =
    the base is exported read-only and the target keeps its own writes."""

    SERVER = "server"
    DEVICE_RAM = "device-ram"


class BootMethod(enum.Enum):
    """How iPXE starts the vDisk: ``sanboot`` over HTTP range reads, or a
    kernel+initrd+cmdline (the vDisk then attached over NBD by the OS)."""

    SANBOOT = "sanboot"
    KERNEL = "kernel"


class ServerState(enum.Enum):
    UP = "up"
    DRAINING = "draining"
    DOWN = "down"


class CopyState(enum.Enum):
    VERIFIED = "verified"
    COPYING = "copying"
    STALE = "stale"
    MISSING = "missing"


class BootstrapMode(enum.Enum):
    """listed: only servers named in the bootstrap are used (the original
    behaviour); live: the login answer carries the current live server list."""

    LISTED = "listed"
    LIVE = "live"


@dataclass(frozen=True, slots=True)
class DeviceView:
    mac: MacAddress
    name: str
    ipv4: IPv4Address | None
    collection: str
    vdisk: str | None
    enabled: bool


@dataclass(frozen=True, slots=True)
class VDiskView:
    name: str
    size_bytes: int
    mode: VDiskMode
    cache_type: CacheType
    digest: str
    boot_method: BootMethod


@dataclass(frozen=True, slots=True)
class ServerView:
    name: str
    address: str
    http_port: int
    nbd_port: int
    tftp_port: int
    state: ServerState
    heartbeat_at: float | None
    load: int
    health: str = "ok"
    """The node's own health summary ("ok" or e.g. "nbd down: timeout")."""

    @property
    def can_stream(self) -> bool:
        """False while the node's own NBD or HTTP check fails (it must not get targets)."""
        return "nbd down" not in self.health and "http down" not in self.health  # per login: no f-strings


@dataclass(frozen=True, slots=True)
class CopyView:
    vdisk: str
    server: str
    path: str
    digest: str | None
    state: CopyState

    def serves(self, vdisk: VDiskView) -> bool:
        """A verified copy of the vDisk's current content: the only kind that is ever
        streamed or assigned (a stale, partial or mismatched copy never is)."""
        return self.vdisk == vdisk.name and self.state is CopyState.VERIFIED and self.digest == vdisk.digest


@dataclass(frozen=True, slots=True)
class BootstrapView:
    servers: tuple[str, ...]
    timeout_ms: int
    mode: BootstrapMode
    version: int


class Inventory(Protocol):
    """What booting needs to know, read from memory (kept fresh elsewhere)."""

    def device_by_mac(self, mac: MacAddress) -> DeviceView | None: ...

    def vdisk(self, name: str) -> VDiskView | None: ...

    def servers(self) -> Sequence[ServerView]: ...

    def copies(self, vdisk: str) -> Sequence[CopyView]: ...

    def bootstrap(self) -> BootstrapView: ...


def servable_copy(inventory: Inventory, node: str, name: str) -> tuple[VDiskView, CopyView] | None:
    """vDisk ``name`` and ``node``'s copy of it, if that copy `serves` it."""
    vdisk = inventory.vdisk(name)
    if vdisk is None:
        return None
    for copy in inventory.copies(name):
        if copy.server == node and copy.serves(vdisk):
            return vdisk, copy
    return None
