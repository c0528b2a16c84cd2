"""Lookups and the audit trail shared by the admin services."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, AddressValueError
from typing import Any

from sqlalchemy import Integer, String, cast, select, update
from sqlalchemy.orm import Session

from pvsfarm.addr import MacAddress
from pvsfarm.db.models import AuditEntry, Collection, Device, FarmSetting, Server, VDisk
from pvsfarm.db.notify import notify_change
from pvsfarm.errors import InvalidInput, NotFound

DEFAULT_COLLECTION = "default"


GENERATION_KEY = "inventory_generation"


def bump_generation(session: Session) -> None:
    """Every admin change bumps the inventory generation, so nodes re-read
    devices/vDisks/copies/bootstrap only when something changed. One atomic
    UPDATE: concurrent bumps never lose one (the row exists since migration 0003)."""
    session.execute(
        update(FarmSetting).where(FarmSetting.key == GENERATION_KEY)
        .values(value=cast(cast(FarmSetting.value, Integer) + 1, String))
    )
    notify_change(session)


def audit(session: Session, actor: str, action: str, obj_type: str, name: str, **detail: Any) -> None:
    bump_generation(session)
    session.add(
        AuditEntry(
            actor=actor,
            action=action,
            object_type=obj_type,
            object_name=name,
            detail=json.dumps(detail, sort_keys=True, default=str),
        )
    )


def parse_ipv4(text: str) -> IPv4Address:
    try:
        ip = IPv4Address(text.strip())
    except AddressValueError as exc:
        raise InvalidInput(f"invalid IPv4 address {text!r}") from exc
    if ip.is_multicast or ip.is_unspecified or ip == IPv4Address("255.255.255.255"):
        raise InvalidInput(f"invalid IPv4 address {text!r}: not a host address")
    return ip


def parse_name(text: str, what: str) -> str:
    name = text.strip()
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidInput(f"invalid {what} name {text!r}: use 1-63 letters, digits, '-', '_', '.'")
    return name


def get_vdisk(session: Session, name: str) -> VDisk:
    vdisk = session.scalar(select(VDisk).where(VDisk.name == name))
    if vdisk is None:
        raise NotFound(f"unknown vDisk {name!r}")
    return vdisk


def get_server(session: Session, name: str) -> Server:
    server = session.scalar(select(Server).where(Server.name == name))
    if server is None:
        raise NotFound(f"unknown server {name!r} (start its node, or `pvsfarm server add`)")
    return server


def get_collection(session: Session, name: str, *, create_default: bool = False) -> Collection:
    coll = session.scalar(select(Collection).where(Collection.name == name))
    if coll is None:
        if create_default and name == DEFAULT_COLLECTION:
            coll = Collection(name=DEFAULT_COLLECTION, description="created automatically")
            session.add(coll)
            session.flush()
            return coll
        raise NotFound(f"unknown collection {name!r}")
    return coll


def get_device(session: Session, key: str) -> Device:
    """A device by name, or by MAC when ``key`` parses as one."""
    device = session.scalar(select(Device).where(Device.name == key))
    if device is None:
        try:
            mac = str(MacAddress.parse(key))
        except InvalidInput:
            mac = None
        if mac is not None:
            device = session.scalar(select(Device).where(Device.mac == mac))
    if device is None:
        raise NotFound(f"unknown device {key!r}")
    return device


def iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
