"""The farm's data model (SQLAlchemy 2 typed ORM; PostgreSQL and SQLite).

Enums are stored as their string values with named CHECK constraints; MACs
as canonical lower-case ``aa:bb:..`` strings; IPv4 as dotted quads. Every
constraint is named through the metadata's naming convention, so Alembic
migrations stay stable on both databases.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from pvsfarm.views import BootMethod, BootstrapMode, CacheType, CopyState, ServerState, VDiskMode

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """A timestamp read back from the database, as UTC-aware (SQLite hands back
    naive datetimes even for ``timezone=True`` columns)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


TS = DateTime(timezone=True)


class Server(Base):
    __tablename__ = "servers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    address: Mapped[str] = mapped_column(String(255))
    http_port: Mapped[int] = mapped_column(Integer, default=8080)
    nbd_port: Mapped[int] = mapped_column(Integer, default=10809)
    tftp_port: Mapped[int] = mapped_column(Integer, default=69)
    state: Mapped[ServerState] = mapped_column(_enum(ServerState, "server_state"), default=ServerState.DOWN)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(TS)
    load: Mapped[int] = mapped_column(Integer, default=0)
    health: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    # Facts each node reports with its heartbeat, for `pvsfarm audit` (NULL = not reported).
    dhcp_subnet: Mapped[str | None] = mapped_column(String(43))
    """CIDR the node's DHCP serves; NULL = DHCP off on that node."""
    offline_cache_at: Mapped[dt.datetime | None] = mapped_column(TS)
    """When the node last saved its offline cache."""
    inventory_generation: Mapped[int | None] = mapped_column(BigInteger)
    """The inventory generation (devices, reservations...) the node serves from."""
    store_shared: Mapped[bool | None] = mapped_column(Boolean)
    """Whether the node's store (and so its write caches) is shared by every node."""


class Store(Base):
    __tablename__ = "stores"
    __table_args__ = (UniqueConstraint("server_id", "path", name="uq_stores_server_path"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    server_id: Mapped[int | None] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"))
    """NULL for a shared store (one path mounted by every node)."""
    path: Mapped[str] = mapped_column(String(1024))
    shared: Mapped[bool] = mapped_column(Boolean, default=False)


class VDisk(Base):
    __tablename__ = "vdisks"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mode: Mapped[VDiskMode] = mapped_column(_enum(VDiskMode, "vdisk_mode"))
    cache_type: Mapped[CacheType] = mapped_column(_enum(CacheType, "cache_type"))
    digest: Mapped[str] = mapped_column(String(71))
    """``sha256:<hex>`` of the content; a copy is verified only when it matches."""
    boot_method: Mapped[BootMethod] = mapped_column(_enum(BootMethod, "boot_method"))
    file_name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    copies: Mapped[list[VDiskCopy]] = relationship(back_populates="vdisk", cascade="all, delete-orphan")


class VDiskCopy(Base):
    __tablename__ = "vdisk_copies"
    __table_args__ = (UniqueConstraint("vdisk_id", "server_id", name="uq_vdisk_copies_vdisk_server"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    vdisk_id: Mapped[int] = mapped_column(ForeignKey("vdisks.id", ondelete="CASCADE"))
    server_id: Mapped[int] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    digest: Mapped[str | None] = mapped_column(String(71))
    state: Mapped[CopyState] = mapped_column(_enum(CopyState, "copy_state"), default=CopyState.MISSING)
    progress_pct: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    vdisk: Mapped[VDisk] = relationship(back_populates="copies")
    server: Mapped[Server] = relationship()


class Collection(Base):
    __tablename__ = "collections"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(String(255), default="")


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[int] = mapped_column(primary_key=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    ipv4: Mapped[str | None] = mapped_column(String(15), unique=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="RESTRICT"))
    vdisk_id: Mapped[int | None] = mapped_column(ForeignKey("vdisks.id", ondelete="RESTRICT"))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    collection: Mapped[Collection] = relationship()
    vdisk: Mapped[VDisk | None] = relationship()


class Bootstrap(Base):
    """A single row (id = 1): the farm's bootstrap settings."""

    __tablename__ = "bootstrap"
    id: Mapped[int] = mapped_column(primary_key=True)
    mode: Mapped[BootstrapMode] = mapped_column(_enum(BootstrapMode, "bootstrap_mode"), default=BootstrapMode.LISTED)
    timeout_ms: Mapped[int] = mapped_column(Integer, default=5000)
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class BootstrapServer(Base):
    __tablename__ = "bootstrap_servers"
    __table_args__ = (UniqueConstraint("bootstrap_id", "server_id", name="uq_bootstrap_servers_server"),)
    bootstrap_id: Mapped[int] = mapped_column(ForeignKey("bootstrap.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    server_id: Mapped[int] = mapped_column(ForeignKey("servers.id", ondelete="RESTRICT"))
    server: Mapped[Server] = relationship()


class StreamSession(Base):
    __tablename__ = "stream_sessions"
    # The heartbeat counts open sessions per server (load): with this partial index that
    # costs the open sessions, not the whole history (10,000 targets, reboots add rows).
    __table_args__ = (
        Index("ix_stream_sessions_open_server", "server_id",
              postgresql_where=text("ended_at IS NULL"), sqlite_where=text("ended_at IS NULL")),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    server_id: Mapped[int] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"), index=True)
    vdisk_id: Mapped[int] = mapped_column(ForeignKey("vdisks.id", ondelete="CASCADE"))
    started_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    last_io_at: Mapped[dt.datetime | None] = mapped_column(TS)
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_written: Mapped[int] = mapped_column(BigInteger, default=0)
    ended_at: Mapped[dt.datetime | None] = mapped_column(TS)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    actor: Mapped[str] = mapped_column(String(63))
    action: Mapped[str] = mapped_column(String(63))
    object_type: Mapped[str] = mapped_column(String(31))
    object_name: Mapped[str] = mapped_column(String(255))
    detail: Mapped[str] = mapped_column(Text, default="")


class FarmSetting(Base):
    """Farm-wide key/value settings (e.g. the export-token signing secret)."""

    __tablename__ = "farm_settings"
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class IssuedMedia(Base):
    """A boot ISO handed out: which bootstrap it carries, to spot stale media."""

    __tablename__ = "issued_media"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="iso")
    bootstrap_version: Mapped[int] = mapped_column(Integer)
    mode: Mapped[BootstrapMode] = mapped_column(_enum(BootstrapMode, "bootstrap_mode"))
    servers: Mapped[str] = mapped_column(Text)
    """JSON list of the server names the medium's script tries, in order."""
    digest: Mapped[str] = mapped_column(String(71))
    path: Mapped[str] = mapped_column(String(1024))
    actor: Mapped[str] = mapped_column(String(63))
    issued_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
