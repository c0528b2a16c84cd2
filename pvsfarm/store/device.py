"""The block-device interface the NBD server reads through, and the file I/O
helpers the store's devices share.

`Extent` and `BlockDevice` are owned by `pvsfarm.streaming.nbd.backend` and
re-exported here, so store users need not reach into the NBD package.

A read is answered as a list of extents rather than bytes so the server can
`os.sendfile`/`os.pread` straight from the vDisk or overlay file (nbdkit and
STYLE.md: payloads stay out of codecs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from threading import Lock

from pvsfarm.errors import Conflict, StoreError
from pvsfarm.streaming.nbd.backend import ZERO_FD, BlockDevice, Extent

__all__ = ["ZERO_FD", "BlockDevice", "Extent", "SharedDevice", "read_bytes"]

SECTOR_BYTES = 512
"""vDisk sizes must be a multiple of this (NBD clients and the Linux block
layer address 512-byte sectors)."""

_CHUNK_BYTES = 1 << 20

# fallocate(2) modes from <linux/falloc.h>.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate():  # noqa: ANN202 - ctypes function object
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range (it then reads as zeros). Returns False when the
    platform or filesystem cannot (e.g. some NFS servers); callers then either
    accept the space cost or write zeros."""
    if _fallocate is None or length <= 0:
        return False
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise StoreError(f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (regular files rarely write
    short, but NFS and signals can)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise StoreError(f"short write at offset {offset}")
        view = view[written:]
        offset += written


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """os.pread exactly ``length`` bytes; reading past end of file is an error
    (the store never does it on a valid file)."""
    parts: list[bytes] = []
    remaining = length
    while remaining:
        chunk = os.pread(fd, remaining, offset)
        if not chunk:
            raise StoreError(f"unexpected end of file at offset {offset}")
        parts.append(chunk)
        remaining -= len(chunk)
        offset += len(chunk)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def write_zero_range(fd: int, offset: int, length: int) -> None:
    """Write real zero bytes (the fallback when punch_hole is unsupported)."""
    zeros = bytes(min(length, _CHUNK_BYTES))
    while length:
        n = min(length, len(zeros))
        pwrite_all(fd, zeros[:n], offset)
        offset += n
        length -= n


def device_size(fd: int) -> int:
    """Size of a regular file or block device (fstat says 0 for the latter)."""
    return os.lseek(fd, 0, os.SEEK_END)


def check_sector_size(size: int, what: str) -> None:
    if size <= 0 or size % SECTOR_BYTES:
        raise StoreError(
            f"{what}: size {size} is not a positive multiple of {SECTOR_BYTES} bytes"
        )


def check_range(size: int, offset: int, length: int) -> None:
    """The NBD server validates requests first; this is the store's own guard."""
    if offset < 0 or length < 0 or offset + length > size:
        raise StoreError(
            f"request [{offset}, {offset + length}) outside device of {size} bytes"
        )


def lock_or_conflict(fd: int, exclusive: bool, message: str) -> None:
    """Take a non-blocking flock; a holder elsewhere (another process, or
    another open of the same file in this one) means `Conflict(message)`.
    The kernel drops the lock when the holder dies, even by kill -9."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    try:
        fcntl.flock(fd, op)
    except BlockingIOError as exc:
        raise Conflict(message) from exc
    except OSError as exc:
        raise StoreError(f"cannot lock: {exc}") from exc


def file_ident(fd: int) -> tuple[int, int]:
    """``(st_dev, st_ino)``: which file an fd is, whatever its path is now."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def open_verified(path: str | os.PathLike[str], flags: int, ident: tuple[int, int] | list[int], what: str) -> int:
    """Open ``path`` and check it is still the file ``ident`` names (another
    process of this node opened it first; a rename since, e.g. a takeover of a
    write cache, must not send us to a different file): `StoreError` if not."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"cannot open {what} {str(path)!r}: {exc}") from exc
    if file_ident(fd) != tuple(ident):
        os.close(fd)
        raise StoreError(f"{what} {str(path)!r} was replaced since it was opened")
    return fd


def read_bytes(device: BlockDevice, offset: int, length: int) -> bytes:
    """Assemble a read from a device's extents (for HTTP range reads, digests
    and tests; the NBD server sends extents without copying them here)."""
    parts = []
    for extent in device.read_extents(offset, length):
        if extent.fd == ZERO_FD:
            parts.append(bytes(extent.length))
        else:
            parts.append(pread_exact(extent.fd, extent.length, extent.file_offset))
    return b"".join(parts)


class SharedDevice:
    """Reference-counted sharing of one device among the NBD connections of a
    session (the NBD server closes its device when each connection ends).

    ``handle()`` returns a `BlockDevice` that forwards everything to the shared
    device except ``close``, which drops one reference; the device itself is
    closed with the last one. Sharing one object is what makes
    ``can_multi_conn`` true for a `WriteCache`.
    """

    def __init__(self, device: BlockDevice) -> None:
        self.device: BlockDevice | None = device
        self._refs = 0
        self._lock = Lock()

    def handle(self) -> _Handle:
        with self._lock:
            if self.device is None:
                raise StoreError("shared device already closed")
            self._refs += 1
        return _Handle(self)

    def _release(self) -> None:
        with self._lock:
            self._refs -= 1
            device, last = self.device, self._refs == 0
            if last:
                self.device = None
        if last and device is not None:
            device.close()


class _Handle:
    def __init__(self, shared: SharedDevice) -> None:
        self._shared = shared
        device = shared.device
        self.size_bytes = device.size_bytes
        self.read_only = device.read_only
        self.can_multi_conn = device.can_multi_conn
        self.read_extents = device.read_extents
        self.pwrite = device.pwrite
        self.flush = device.flush
        self.trim = device.trim
        self.write_zeroes = device.write_zeroes
        self.handoff_spec = getattr(device, "handoff_spec", None)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._shared._release()
