"""Whole-file vDisk devices: the read-only base export and the private image.

Locking (flock, dropped by the kernel when the holder dies, even by kill -9):
a `BaseImage` holds a *shared* lock and a `PrivateImage` an *exclusive* one, so
a vDisk cannot be opened read-write while any target streams it as a base, and
a private image has one opener at a time. flock is reliable between processes
on one host; across hosts it depends on the filesystem (Linux NFSv4 maps it to
a byte-range lock and honours it; CIFS and FUSE stores may not).

The node's NBD worker processes re-open a device its main process opened
(``handoff_spec`` -> ``attach=``): same file (checked by inode), and a private
image is attached without the lock, which its owner holds.
"""

from __future__ import annotations

import os
from pathlib import Path

from pvsfarm.errors import Conflict, StoreError
from pvsfarm.store.device import (
    Extent,
    check_range,
    check_sector_size,
    device_size,
    file_ident,
    lock_or_conflict,
    open_verified,
    punch_hole,
    pwrite_all,
    write_zero_range,
)

_OWNER_SUFFIX = ".owner"


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise StoreError(f"vDisk file {str(path)!r} does not exist") from exc
    except OSError as exc:
        raise StoreError(f"cannot open vDisk file {str(path)!r}: {exc}") from exc


class BaseImage:
    """A vDisk file exported read-only (standard-image base, or device-RAM cache).

    The file is opened O_RDONLY and never written, so any number of sessions
    and connections may read it (``can_multi_conn``). Callers own the object
    and must `close` it; a `WriteCache` built on it does not close it.
    """

    read_only = True
    can_multi_conn = True

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None,
                 attach: tuple[int, int] | list[int] | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        if attach is None:
            self.fd = _open(self.path, os.O_RDONLY)
        else:
            self.fd = open_verified(self.path, os.O_RDONLY, attach, "vDisk file")
        try:
            lock_or_conflict(
                self.fd,
                exclusive=False,
                message=f"vDisk {self.name!r} is opened read-write as a private image",
            )
            self.size_bytes = device_size(self.fd)
            check_sector_size(self.size_bytes, f"vDisk {self.name!r}")
        except BaseException:
            os.close(self.fd)
            raise

    def read_extents(self, offset: int, length: int) -> list[Extent]:
        check_range(self.size_bytes, offset, length)
        return [Extent(self.fd, offset, length)] if length else []

    def ident(self) -> list[int]:
        return list(file_ident(self.fd))

    def handoff_spec(self) -> dict[str, object]:
        return {"kind": "base", "path": str(self.path), "ident": self.ident()}

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        raise StoreError(f"vDisk {self.name!r} is exported read-only")

    def flush(self) -> None:
        """Nothing to flush: nothing is ever written."""

    def trim(self, offset: int, length: int) -> None:
        raise StoreError(f"vDisk {self.name!r} is exported read-only")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise StoreError(f"vDisk {self.name!r} is exported read-only")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BaseImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_owner() -> str:
    return f"pid {os.getpid()} on {os.uname().nodename}"


class PrivateImage:
    """A private-image vDisk: one target at a time, read-write on the file.

    A second opener, in this process or another, is refused with `Conflict`,
    whose message names the holder recorded in a ``<file>.owner`` sidecar
    (best effort: a missing sidecar just says "another process"). FUA and
    flush are `os.fdatasync`. All connections of the one session may share
    the object (``can_multi_conn``): they write through one fd, so a flush on
    any of them covers the writes of all.
    """

    read_only = False
    can_multi_conn = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        owner: str | None = None,
        attach: tuple[int, int] | list[int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self._owner_path = self.path.with_name(self.path.name + _OWNER_SUFFIX)
        self._attached = attach is not None
        if attach is None:
            self.fd = _open(self.path, os.O_RDWR)
        else:
            self.fd = open_verified(self.path, os.O_RDWR, attach, "vDisk file")
        try:
            if not self._attached:
                self._acquire(owner or default_owner())
            self.size_bytes = device_size(self.fd)
            check_sector_size(self.size_bytes, f"vDisk {self.name!r}")
        except BaseException:
            os.close(self.fd)
            raise

    def _acquire(self, owner: str) -> None:
        try:
            lock_or_conflict(self.fd, exclusive=True, message="")
        except Conflict as exc:
            holder = self._read_owner() or "another process (or it is in use as a base)"
            raise Conflict(
                f"vDisk {self.name!r} is a private image already opened by {holder}"
            ) from exc
        try:
            self._owner_path.write_text(owner + "\n")
        except OSError:
            pass  # the sidecar only improves the Conflict message

    def _read_owner(self) -> str:
        try:
            return self._owner_path.read_text().strip()
        except OSError:
            return ""

    def read_extents(self, offset: int, length: int) -> list[Extent]:
        check_range(self.size_bytes, offset, length)
        return [Extent(self.fd, offset, length)] if length else []

    def handoff_spec(self) -> dict[str, object]:
        return {"kind": "private", "path": str(self.path), "ident": list(file_ident(self.fd))}

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        check_range(self.size_bytes, offset, len(data))
        pwrite_all(self.fd, data, offset)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int) -> None:
        """Deallocate; the range then reads as zeros (we keep TRIM
        deterministic, as WriteCache does)."""
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        check_range(self.size_bytes, offset, length)
        if not punch_hole(self.fd, offset, length):
            write_zero_range(self.fd, offset, length)

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if not self._attached:  # the owner's sidecar, not ours to remove
                self._owner_path.unlink(missing_ok=True)
        except OSError:
            pass  # a stale sidecar is harmless: only read when the lock is held
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> PrivateImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
