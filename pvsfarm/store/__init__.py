"""The vDisk store: block devices the NBD server streams from.

- `BaseImage`: a vDisk exported read-only (standard-image base).
- `WriteCache`: base + per-target overlay file (standard image, server-side cache).
- `PrivateImage`: a vDisk opened read-write by one target at a time.
- `SharedDevice`: one device shared by the NBD connections of a session.
- `sha256_file`: the content digest of a vDisk copy.
"""

from pvsfarm.store.device import BlockDevice, Extent, SharedDevice, read_bytes
from pvsfarm.store.digest import base_fingerprint, sha256_file
from pvsfarm.store.images import BaseImage, PrivateImage
from pvsfarm.store.writecache import DEFAULT_BLOCK_BYTES, WriteCache

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "BaseImage",
    "BlockDevice",
    "Extent",
    "PrivateImage",
    "SharedDevice",
    "WriteCache",
    "base_fingerprint",
    "read_bytes",
    "sha256_file",
]
