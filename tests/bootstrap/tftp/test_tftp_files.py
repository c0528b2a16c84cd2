"""Filename normalisation and confinement under the TFTP root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvsfarm.bootstrap.tftp.files import SMALL_FILE_BYTES, normalize_name, open_in_root
from pvsfarm.errors import RemoteProtocolError


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("boot.ipxe", "boot.ipxe"),
        ("/boot.ipxe", "boot.ipxe"),
        ("//a/./b", "a/b"),
        ("\\boot\\x64\\wdsnbp.com", "boot/x64/wdsnbp.com"),
    ],
)
def test_normalize(raw: str, name: str) -> None:
    assert normalize_name(raw) == name


@pytest.mark.parametrize(("raw", "code"), [("../../etc/passwd", 2), ("a/../../b", 2), ("..\\x", 2), ("", 1), ("/", 1)])
def test_normalize_refuses(raw: str, code: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        normalize_name(raw)
    assert info.value.code == code


def test_open_small_large_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"abc")
    big = os.urandom(SMALL_FILE_BYTES + 10)
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "dir").mkdir()
    (tmp_path / "out").symlink_to("/etc/hostname")
    (tmp_path / "in").symlink_to("small")
    small = open_in_root(tmp_path, "small")
    assert small.fd is None and small.read_at(1, 5) == b"bc"
    src = open_in_root(tmp_path, "big")
    assert src.size_bytes == len(big) and src.read_at(SMALL_FILE_BYTES, 100) == big[SMALL_FILE_BYTES:]
    src.close()
    assert src.fd is None
    assert open_in_root(tmp_path, "in").read_at(0, 3) == b"abc"
    for name, code in [("out", 2), ("dir", 1), ("missing", 1), ("etc/passwd", 1)]:
        with pytest.raises(RemoteProtocolError) as info:
            open_in_root(tmp_path, name)
        assert info.value.code == code, name
