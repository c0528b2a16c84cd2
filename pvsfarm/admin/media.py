"""Boot media handed out (`pvsfarm bootstrap iso`): built, recorded, judged stale.

Each ISO is recorded with the bootstrap version and the server list its
script carries, so `pvsfarm bootstrap show` can say which issued ISOs are
stale and `pvsfarm audit` which list servers no longer in the farm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pvsfarm.admin.common import audit, iso
from pvsfarm.admin.farm import show_bootstrap
from pvsfarm.bootstrap.ipxe import Endpoint
from pvsfarm.bootstrap.iso import IsoSources, build_iso, iso_script
from pvsfarm.db.models import IssuedMedia, Server
from pvsfarm.views import BootstrapMode


def _endpoints(session: Session, boot: dict[str, Any]) -> list[Endpoint]:
    """Listed mode: the bootstrap's servers only. Live mode: those first, then every
    other known server, so the ISO finds a node to ask for the live list."""
    names = [s["name"] for s in boot["servers"]]
    if boot["mode"] == BootstrapMode.LIVE.value:
        names += sorted(n for n in session.scalars(select(Server.name)) if n not in names)
    rows = {s.name: s for s in session.scalars(select(Server).where(Server.name.in_(names)))}
    return [Endpoint(n, f"http://{rows[n].address}:{rows[n].http_port}") for n in names]


def issue_iso(session: Session, actor: str, out: Path, sources: IsoSources | None = None) -> dict[str, Any]:
    """Build the boot ISO from the current bootstrap and record that it was issued."""
    boot = show_bootstrap(session)
    live = boot["mode"] == BootstrapMode.LIVE.value
    endpoints = _endpoints(session, boot)
    script = iso_script(endpoints, boot["timeout_ms"], boot["version"], live=live)
    digest = build_iso(script, boot["version"], out, sources)
    row = IssuedMedia(kind="iso", bootstrap_version=boot["version"], mode=BootstrapMode(boot["mode"]),
                      servers=json.dumps([e.name for e in endpoints]), digest=digest,
                      path=str(out.resolve()), actor=actor)
    session.add(row)
    session.flush()
    audit(session, actor, "issue", "iso", f"#{row.id}", path=row.path, bootstrap_version=boot["version"])
    return {**_media_dict(row, boot["version"]), "size_bytes": out.stat().st_size}


def media_servers(row: IssuedMedia) -> tuple[str, ...]:
    return tuple(json.loads(row.servers))


def _media_dict(row: IssuedMedia, current_version: int) -> dict[str, Any]:
    return {"id": row.id, "kind": row.kind, "bootstrap_version": row.bootstrap_version, "mode": row.mode.value,
            "servers": list(media_servers(row)), "path": row.path, "digest": row.digest,
            "issued_at": iso(row.issued_at), "stale": row.bootstrap_version < current_version}


def list_media(session: Session) -> list[dict[str, Any]]:
    current = show_bootstrap(session)["version"]
    rows = session.scalars(select(IssuedMedia).order_by(IssuedMedia.id))
    return [_media_dict(r, current) for r in rows]


def media_status(session: Session) -> dict[str, Any]:
    """For `bootstrap show`: the issued media and a one-line verdict on their staleness."""
    media = list_media(session)
    stale = [m for m in media if m["stale"]]
    if not media:
        verdict = "no boot ISO issued"
    elif not stale:
        verdict = f"{len(media)} issued, all built from the current bootstrap"
    else:
        ids = ", ".join(f"#{m['id']} (v{m['bootstrap_version']}, {m['mode']})" for m in stale)
        verdict = (f"{len(stale)} of {len(media)} STALE: {ids}; rebuild with `pvsfarm bootstrap iso` "
                   "(live-mode ISOs still find the live list if a server they name answers)")
    return {"issued_media": verdict, "media": media}
