"""Node configuration: frozen dataclasses per component, one strict YAML loader.

An unknown key or a value of the wrong type raises
``ConfigError("dhcp.lease_s: expected int")`` naming the dotted path (the
opposite of silently ignored keys). Every field is documented; units are in
the names.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pvsfarm.errors import ConfigError
from pvsfarm.streaming.nbd.config import NbdConfig as _NbdServerConfig

_NBD = _NbdServerConfig()  # the NBD server's own defaults, which the node's nbd section keeps


def default_data_dir() -> Path:
    """``$PVSFARM_DATA_DIR``, else ``/var/lib/pvsfarm`` as root, else ``~/.local/share/pvsfarm``."""
    env = os.environ.get("PVSFARM_DATA_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/pvsfarm")
    return Path.home() / ".local" / "share" / "pvsfarm"


@dataclass(frozen=True, slots=True)
class DhcpConfig:
    interface: str | None = None
    """Interface DHCP serves. None (the default) = DHCP off: a node started
    with defaults must never answer DHCP on a machine's network by surprise."""
    listen_port: int = 67
    """UDP port (RFC 2131 §4.1: servers receive on 67)."""
    server_ip: str | None = None
    """This node's address on that interface (server identifier, next-server)."""
    subnet: str | None = None
    """The served subnet in CIDR form; reservations outside it are not answered."""
    router: str | None = None
    dns_servers: list[str] = field(default_factory=list)
    lease_s: int = 86400
    """Lease time. Reservations are static, so a long lease (a day, as Kea's
    default valid-lifetime 4000 s x ~20) costs nothing and cuts renew traffic."""
    proxy_mode: bool = False
    """ProxyDHCP: boot information only, addresses belong to another server."""
    bios_loader: str = "undionly.kpxe"
    efi_loader: str = "ipxe.efi"


@dataclass(frozen=True, slots=True)
class TftpConfig:
    enabled: bool = True
    listen_address: str = "0.0.0.0"
    listen_port: int = 69
    """RFC 1350 well-known port."""
    root: str | None = None
    """TFTP root (default: <data_dir>/tftp, holding the iPXE loaders)."""
    max_transfers: int = 512
    """Concurrent transfers cap (boot storms: 500 targets, see issue figures)."""
    busy_poll_us: int = 50
    """While at most two transfers run, how long one spins for the next ACK before
    sleeping (0 disables: no CPU spent waiting). Trades a little CPU for lock-step
    speed when the client answers within microseconds (benchmarks/tftp_bench.py)."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    enabled: bool = True
    listen_address: str = "0.0.0.0"
    listen_port: int = 8080
    """Login API / bootstrap / sanboot port."""


@dataclass(frozen=True, slots=True)
class NbdConfig:
    enabled: bool = True
    listen_address: str = "0.0.0.0"
    listen_port: int = 10809
    """IANA-registered NBD port."""
    max_request_bytes: int = _NBD.max_request_bytes
    """Largest READ/WRITE accepted (the NBD spec's 32 MiB advisory maximum)."""
    admin_from_loopback_only: bool = True
    """Administrators may open a vDisk read-only by name only from loopback."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Worker processes that serve connections after the handshake (one Python process
    uses one core: benchmarks/nbd_bench.py); default one per CPU, 0 = all in the node process."""
    send_buffer_bytes: int = _NBD.send_buffer_bytes
    """SO_SNDBUF of each NBD connection (the kernel caps it at net.core.wmem_max); 0 keeps
    the kernel's autotuning. Large reads stalled on a full socket buffer with autotuning
    (qemu-img convert: 0.52-0.64 s per GiB, 0.42-0.45 s with 4 MiB)."""
    notsent_lowat_bytes: int = _NBD.notsent_lowat_bytes
    """TCP_NOTSENT_LOWAT of each NBD connection: unsent data allowed to wait in the socket
    (0 = the system's, unlimited by default). 4 MiB made large sendfile'd replies steady
    (pvsfarm/streaming/nbd/config.py has the figures)."""
    busy_poll_us: int = _NBD.busy_poll_us
    """How long a worker spins for a client's next request while none of its other
    connections has input, instead of sleeping (0 disables). Queue-depth-1 reads on a VM
    without halt polling ran 10-11k IOPS sleeping, ~20k spinning (benchmarks/nbd_bench.py)."""
    tcp_congestion: str = _NBD.tcp_congestion
    """TCP congestion control of NBD connections ("" = the system's). Default cubic: on a
    LAN, BBR without the fq qdisc paces inside TCP and slowed sendfile streaming
    (pvsfarm/streaming/nbd/config.py TCP_CONGESTION has the figures)."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: str | None = None
    """Directory holding vDisk files and write caches (default <data_dir>/store)."""
    shared: bool = False
    """True when every node mounts the same store (write caches move with targets)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    """This server's name in the farm (unique)."""
    address: str = "127.0.0.1"
    """Address targets use to reach this node (advertised in the bootstrap)."""
    data_dir: str | None = None
    """Where the embedded database, store and offline cache live."""
    database_url: str | None = None
    """SQLAlchemy URL (postgresql+psycopg2://...). None = embedded SQLite."""
    offline_cache: str | None = None
    """Local SQLite copy of what booting needs (default <data_dir>/offline.sqlite)."""
    heartbeat_interval_s: float = 1.0
    dead_after_s: float = 5.0
    """A node whose heartbeat is older than this is out of assignments."""
    admin_faults: bool = False
    """Fault injection for tests: ``POST /admin/fault`` from loopback may break
    this node's services (e.g. make its TFTP drop every request). Off in
    production; with it on, HTTP also listens on 127.0.0.1 when its
    listen_address is one non-loopback address."""
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    tftp: TftpConfig = field(default_factory=TftpConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    nbd: NbdConfig = field(default_factory=NbdConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'pvsfarm.sqlite'}"

    @property
    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.data_path / "store"

    @property
    def tftp_root(self) -> Path:
        return Path(self.tftp.root) if self.tftp.root else self.data_path / "tftp"

    @property
    def offline_cache_path(self) -> Path:
        if self.offline_cache:
            return Path(self.offline_cache)
        return self.data_path / "offline.sqlite"


def _check_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int")
        if value < 0:  # every int here is a port, a count, a size or a duration
            raise ConfigError(f"{path}: expected a non-negative int")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected string")
        return value
    raise ConfigError(f"{path}: unsupported type")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected list")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    return _check_scalar(value, tp, path)


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<top>'}: expected mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def load_config(path: str | os.PathLike[str] | None) -> NodeConfig:
    """Load and validate a YAML file; ``None`` gives the embedded defaults."""
    if path is None:
        return NodeConfig()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc.__class__.__name__})") from exc
    return parse_config(data)


def parse_config(data: Any) -> NodeConfig:
    """Build a NodeConfig from already-parsed YAML data (strict)."""
    cfg: NodeConfig = _build(NodeConfig, data, "")
    if cfg.dhcp.interface is not None:
        for key in ("server_ip", "subnet"):
            if getattr(cfg.dhcp, key) is None:
                raise ConfigError(f"dhcp.{key}: required when dhcp.interface is set")
    return cfg
