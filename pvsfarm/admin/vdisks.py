"""vDisks: registration (digest, copy into the store), update, copy status, listing, removal."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from pvsfarm.admin.common import audit, get_server, get_vdisk, iso, parse_name
from pvsfarm.db.models import Device, Server, VDisk, VDiskCopy, utcnow
from pvsfarm.errors import Conflict, InvalidInput, StoreError
from pvsfarm.store.digest import sha256_file
from pvsfarm.views import BootMethod, CacheType, CopyState, VDiskMode

Progress = Callable[[int, int], None]
"""progress(done_bytes, total_bytes)."""
ProgressFactory = Callable[[str], Progress]
"""progress_for(phase) -> a Progress for that phase ('copy', 'digest')."""

CHUNK_BYTES = 1 << 20
SECTOR_BYTES = 512


def check_image(path: Path) -> int:
    """Size of a vDisk image file, or InvalidInput naming what is wrong."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise InvalidInput(f"vDisk file {str(path)!r} does not exist") from exc
    except OSError as exc:
        raise InvalidInput(f"vDisk file {str(path)!r}: {exc.strerror}") from exc
    if not path.is_file():
        raise InvalidInput(f"vDisk file {str(path)!r} is not a regular file")
    if st.st_size == 0 or st.st_size % SECTOR_BYTES:
        raise InvalidInput(
            f"vDisk file {str(path)!r} is {st.st_size} bytes: not a non-zero multiple of {SECTOR_BYTES}"
        )
    return st.st_size


def digest_file(path: Path, progress: Progress | None = None) -> str:
    """``sha256:<hex>`` of a file: the store's digest, with the prefix the database records."""
    return "sha256:" + sha256_file(path, progress)


def copy_into_store(src: Path, dst: Path, progress: Progress | None = None) -> None:
    """Copy via a temporary name then rename, so a partial copy is never visible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    total = src.stat().st_size
    done = 0
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            while chunk := fin.read(CHUNK_BYTES):
                fout.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot copy {src} into the store: {exc.strerror}") from exc


def vdisk_dict(v: VDisk) -> dict[str, Any]:
    return {
        "name": v.name,
        "size_bytes": v.size_bytes,
        "mode": v.mode.value,
        "cache_type": v.cache_type.value,
        "boot_method": v.boot_method.value,
        "digest": v.digest,
        "file": v.file_name,
        "updated_at": iso(v.updated_at),
        "copies": [
            {"server": c.server.name, "path": c.path, "state": c.state.value, "progress_pct": c.progress_pct}
            for c in sorted(v.copies, key=lambda c: c.server.name)
        ],
    }


def add_vdisk(
    session: Session,
    actor: str,
    server: Server,
    name: str,
    image: Path,
    store_dir: Path,
    *,
    mode: VDiskMode,
    cache_type: CacheType,
    boot_method: BootMethod,
    copy: bool = True,
    progress_for: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Register a vDisk from ``image``. The copy in the store is verified (its digest is the vDisk's)."""
    name = parse_name(name, "vDisk")
    if session.scalar(select(VDisk).where(VDisk.name == name)) is not None:
        raise Conflict(f"vDisk {name!r} already exists")
    size = check_image(image)
    if mode is VDiskMode.PRIVATE and cache_type is CacheType.DEVICE_RAM:
        raise InvalidInput("a private image has no write cache: --cache applies to standard images only")
    target = image.resolve()
    if copy and target.parent != store_dir.resolve():
        target = store_dir.resolve() / f"{name}.img"
        if target.exists():
            raise Conflict(f"{target} already exists in the store")
        copy_into_store(image, target, progress_for("copy") if progress_for else None)
    digest = digest_file(target, progress_for("digest") if progress_for else None)
    vdisk = VDisk(
        name=name, size_bytes=size, mode=mode, cache_type=cache_type, digest=digest,
        boot_method=boot_method, file_name=target.name,
    )
    vdisk.copies.append(
        VDiskCopy(server=server, path=str(target), digest=digest, state=CopyState.VERIFIED, progress_pct=100)
    )
    session.add(vdisk)
    session.flush()
    audit(session, actor, "add", "vdisk", name, size_bytes=size, digest=digest, mode=mode.value)
    return vdisk_dict(vdisk)


def add_copy(session: Session, actor: str, name: str, server: Server | str, image: Path,
             progress: Progress | None = None) -> dict[str, Any]:
    """Record ``image`` as ``server``'s copy of vDisk ``name``, verified by digest.

    Run where ``image`` is readable at that path (on the server itself, or on a
    shared store). A file whose size or digest differs from the vDisk's is
    refused (`StoreError`), never recorded: a stale copy must not be served.
    Re-running it re-verifies an existing copy (e.g. after an rsync).
    """
    vdisk = get_vdisk(session, name)
    holder = get_server(session, server) if isinstance(server, str) else server
    size = check_image(image)
    if size != vdisk.size_bytes:
        raise StoreError(f"{image} is {size} bytes, vDisk {name!r} is {vdisk.size_bytes}: not a copy of it")
    digest = digest_file(image, progress)
    if digest != vdisk.digest:
        raise StoreError(f"{image} has digest {digest}, vDisk {name!r} has {vdisk.digest}: stale or different file")
    copy = _copy_row(session, vdisk, holder)
    copy.path, copy.digest, copy.state, copy.progress_pct = str(image.resolve()), digest, CopyState.VERIFIED, 100
    copy.updated_at = utcnow()
    session.flush()
    audit(session, actor, "copy", "vdisk", name, server=holder.name, path=copy.path, digest=digest)
    return vdisk_dict(vdisk)


def _copy_row(session: Session, vdisk: VDisk, holder: Server) -> VDiskCopy:
    """The server's copy row, created if missing. A node's replicator may create
    the same row at the same moment: the loser of that race re-reads the winner's
    row instead of failing on the unique constraint."""
    copy = next((c for c in vdisk.copies if c.server_id == holder.id), None)
    if copy is not None:
        return copy
    try:
        with session.begin_nested():
            copy = VDiskCopy(vdisk_id=vdisk.id, server_id=holder.id, path="", state=CopyState.MISSING,
                             progress_pct=0)
            session.add(copy)
    except IntegrityError:
        copy = session.scalar(select(VDiskCopy).where(VDiskCopy.vdisk_id == vdisk.id,
                                                      VDiskCopy.server_id == holder.id))
        if copy is None:
            raise
    session.refresh(vdisk)
    return copy


def update_vdisk(session: Session, actor: str, server: Server, name: str, image: Path, store_dir: Path,
                 progress_for: ProgressFactory | None = None) -> dict[str, Any]:
    """Replace vDisk ``name``'s content with ``image``, on ``server`` (this node).

    The file is copied into the store as ``<name>.img`` through a temporary
    name and a rename (targets streaming the old file keep reading it) and
    digested; it becomes ``server``'s verified copy and the vDisk's digest.
    When the digest changed, every other copy is marked stale: it is never
    served again, and its node re-syncs it from a peer (`store.replicate`).
    """
    vdisk = get_vdisk(session, name)
    size = check_image(image)
    target = store_dir.resolve() / f"{vdisk.name}.img"
    copy_into_store(image, target, progress_for("copy") if progress_for else None)
    digest = digest_file(target, progress_for("digest") if progress_for else None)
    old, now = vdisk.digest, utcnow()
    vdisk.digest, vdisk.size_bytes, vdisk.file_name, vdisk.updated_at = digest, size, target.name, now
    own = next((c for c in vdisk.copies if c.server_id == server.id), None)
    if own is None:
        own = VDiskCopy(server=server)
        vdisk.copies.append(own)
    for copy in vdisk.copies:
        if copy is not own and digest != old:
            copy.state, copy.progress_pct, copy.updated_at = CopyState.STALE, 0, now
    own.path, own.digest, own.state, own.progress_pct, own.updated_at = (
        str(target), digest, CopyState.VERIFIED, 100, now)
    session.flush()
    audit(session, actor, "update", "vdisk", name, server=server.name, size_bytes=size, digest=digest, previous=old)
    return vdisk_dict(vdisk)


def _status_row(vdisk: VDisk, server: Server, copy: VDiskCopy | None) -> dict[str, Any]:
    state = copy.state.value if copy else CopyState.MISSING.value
    if copy is not None and copy.state is CopyState.VERIFIED and copy.digest != vdisk.digest:
        state = CopyState.STALE.value  # verified once, but for an older digest
    pct = copy.progress_pct if copy else 0
    return {"vdisk": vdisk.name, "server": server.name, "state": state, "progress_pct": pct,
            "status": f"copying {pct}%" if state == CopyState.COPYING.value else state,
            "path": copy.path if copy else None, "updated_at": iso(copy.updated_at) if copy else None}


def vdisk_status(session: Session, name: str | None = None) -> list[dict[str, Any]]:
    """Each vDisk x each known server: verified / copying n% / stale / missing (no copy row)."""
    servers = session.scalars(select(Server).order_by(Server.name)).all()
    if name is not None:
        chosen = [get_vdisk(session, name)]
    else:
        chosen = list(session.scalars(select(VDisk).options(selectinload(VDisk.copies)).order_by(VDisk.name)))
    rows = []
    for vdisk in chosen:
        by_server = {c.server_id: c for c in vdisk.copies}
        rows += [_status_row(vdisk, srv, by_server.get(srv.id)) for srv in servers]
    return rows


def list_vdisks(session: Session) -> list[dict[str, Any]]:
    stmt = select(VDisk).options(selectinload(VDisk.copies).joinedload(VDiskCopy.server)).order_by(VDisk.name)
    return [vdisk_dict(v) for v in session.scalars(stmt)]


def show_vdisk(session: Session, name: str) -> dict[str, Any]:
    return vdisk_dict(get_vdisk(session, name))


def remove_vdisk(session: Session, actor: str, name: str) -> str:
    """Unregister a vDisk (its files stay on disk). Refused while devices use it."""
    vdisk = get_vdisk(session, name)
    users = session.scalars(select(Device.name).where(Device.vdisk_id == vdisk.id).order_by(Device.name)).all()
    if users:
        more = f" and {len(users) - 3} more" if len(users) > 3 else ""
        raise Conflict(f"vDisk {name!r} is assigned to device(s) {', '.join(users[:3])}{more}")
    session.delete(vdisk)
    audit(session, actor, "remove", "vdisk", name)
    return name


__all__ = ["add_vdisk", "add_copy", "update_vdisk", "vdisk_status", "list_vdisks", "show_vdisk", "remove_vdisk",
           "check_image", "digest_file"]
