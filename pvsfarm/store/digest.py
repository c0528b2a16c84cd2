"""Content digests of vDisk files.

`sha256_file` is the full content digest the farm records per vDisk copy (a
stale copy is one whose digest differs). `base_fingerprint` is a cheap
identity for a write cache's header when the caller has no full digest at
hand: hashing a 100 GiB base at every boot would turn a boot storm into a
disk-read storm.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from pvsfarm.errors import StoreError
from pvsfarm.store.device import pread_exact

CHUNK_BYTES = 1 << 20
_FINGERPRINT_EDGE_BYTES = 1 << 20
_FINGERPRINT_SAMPLES = 16
_FINGERPRINT_SAMPLE_BYTES = 4096

Progress = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` after each chunk."""


def sha256_file(path: str | os.PathLike[str], progress: Progress | None = None) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    done = 0
    try:
        with open(path, "rb", buffering=0) as f:
            total = os.fstat(f.fileno()).st_size
            while n := f.readinto(buf):
                digest.update(view[:n])
                done += n
                if progress is not None:
                    progress(done, total)
    except OSError as exc:
        raise StoreError(f"cannot read {str(path)!r} for its digest: {exc}") from exc
    return digest.hexdigest()


def base_fingerprint(fd: int, size: int) -> str:
    """``fp:`` + SHA-256 over the size, the first and last MiB and 16 evenly
    spaced 4 KiB samples. Distinguishes different vDisks and versions cheaply
    (content-based, so identical local copies on different nodes agree); it is
    not a proof of identity, for that pass the full digest instead."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    edge = min(size, _FINGERPRINT_EDGE_BYTES)
    digest.update(pread_exact(fd, edge, 0))
    digest.update(pread_exact(fd, edge, size - edge))
    sample = min(size, _FINGERPRINT_SAMPLE_BYTES)
    for i in range(_FINGERPRINT_SAMPLES):
        offset = (size - sample) * i // _FINGERPRINT_SAMPLES
        digest.update(pread_exact(fd, sample, offset))
    return "fp:" + digest.hexdigest()
