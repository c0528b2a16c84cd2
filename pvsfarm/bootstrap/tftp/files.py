"""Where a TFTP filename leads: name normalisation, root confinement, reading.

Names follow tftpd-hpa ``--secure`` conventions because that is what PXE
configurations in the wild are written for: leading slashes are dropped (the
root is ``/``), backslashes are separators (Windows/WDS-style names such as
``\\boot\\x64\\wdsnbp.com``), ``..`` is refused.  The resolved path (after
symlinks) must stay inside the root, so a symlink pointing out of it is
refused too.  Errors carry the TFTP code the server answers with.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pvsfarm.bootstrap.tftp.wire import ErrorCode
from pvsfarm.errors import RemoteProtocolError

__all__ = ["FileSource", "normalize_name", "open_in_root", "source_from_bytes"]

SMALL_FILE_BYTES = 64 * 1024
"""Files up to this size are read whole and their descriptor closed at once
(a boot storm of small files then holds no descriptors); larger ones are read
with ``os.pread`` from a descriptor opened once (the session reads ahead in
64 KiB chunks, `session.READ_AHEAD_BYTES`)."""


@dataclass(slots=True)
class FileSource:
    """An open file (or in-memory content) of known size."""

    size_bytes: int
    read_at: Callable[[int, int], bytes]
    """``read_at(offset, length)`` → exactly ``length`` bytes (fewer at EOF)."""
    fd: int | None = field(default=None)
    key: tuple[int, ...] | None = field(default=None)
    """This version of a file under the root, ``(st_dev, st_ino, st_size,
    st_mtime_ns, st_ctime_ns)`` at open: what transfers may share DATA by
    (None: content made per request, never shared).  A replaced file has a
    new inode; one rewritten in place a new mtime and ctime (ctime even when
    ``touch -d`` puts the mtime back)."""

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _pread(fd: int) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read_at


def source_from_bytes(content: bytes) -> FileSource:
    view = memoryview(content)
    return FileSource(len(content), lambda offset, length: bytes(view[offset : offset + length]))


def normalize_name(filename: str) -> str:
    """The root-relative name ``filename`` designates, or RemoteProtocolError."""
    parts = [p for p in filename.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RemoteProtocolError(f"{filename!r}: '..' is not allowed", code=ErrorCode.ACCESS_VIOLATION)
    if not parts or "\0" in filename:
        raise RemoteProtocolError(f"{filename!r}: no such file", code=ErrorCode.FILE_NOT_FOUND)
    return "/".join(parts)


def open_in_root(root: Path, name: str) -> FileSource:
    """Open the normalised ``name`` under ``root`` for reading."""
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, name))
    if os.path.commonpath([real_root, path]) != real_root:
        raise RemoteProtocolError(f"{name!r} leads outside the root", code=ErrorCode.ACCESS_VIOLATION)
    try:
        # O_NOFOLLOW: realpath() resolved every link; a link appearing since is refused.
        # O_NONBLOCK: opening a FIFO placed in the root must not block the event loop.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise RemoteProtocolError(f"{name!r}: no such file", code=ErrorCode.FILE_NOT_FOUND) from exc
    except OSError as exc:
        raise RemoteProtocolError(f"{name!r}: {exc.strerror}", code=ErrorCode.ACCESS_VIOLATION) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RemoteProtocolError(f"{name!r} is not a regular file", code=ErrorCode.FILE_NOT_FOUND)
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if info.st_size > SMALL_FILE_BYTES:
            return FileSource(info.st_size, _pread(fd), fd, key)
        content = os.pread(fd, info.st_size, 0)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    source = source_from_bytes(content)
    if len(content) == info.st_size:  # else it changed under us: never share this read
        source.key = key
    return source
