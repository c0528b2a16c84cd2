from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pvsfarm.errors import StoreError
from pvsfarm.store import base_fingerprint, sha256_file
from pvsfarm.store.digest import CHUNK_BYTES


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, 2 * CHUNK_BYTES + 7])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_file_reports_progress_per_chunk(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(2 * CHUNK_BYTES + 10))
    calls: list[tuple[int, int]] = []
    sha256_file(path, progress=lambda done, total: calls.append((done, total)))
    total = 2 * CHUNK_BYTES + 10
    assert calls == [(CHUNK_BYTES, total), (2 * CHUNK_BYTES, total), (total, total)]


def test_sha256_file_missing_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        sha256_file(tmp_path / "absent")


def test_fingerprint_depends_on_content_and_size(tmp_path: Path) -> None:
    def fp(data: bytes) -> str:
        path = tmp_path / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            return base_fingerprint(fd, len(data))
        finally:
            os.close(fd)

    a = fp(bytes(4096))
    assert a.startswith("fp:") and a == fp(bytes(4096))
    assert a != fp(bytes(4096 + 512))
    assert a != fp(bytes(4095) + b"\1")
    assert fp(bytes(8 << 20)) != fp(bytes(4 << 20) + b"\1" + bytes((4 << 20) - 1))
