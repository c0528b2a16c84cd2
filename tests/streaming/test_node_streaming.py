"""A real node: login over HTTP gives a token; real NBD clients read and write the export."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import have
from tests.nodes import RunningNode, admin, start_node

pytestmark = pytest.mark.skipif(not (have("nbdinfo") and have("nbdcopy") and have("qemu-io")),
                                reason="needs libnbd-bin and qemu-utils")
MAC = "52:54:00:12:34:56"
IMAGE_BYTES = 256 * 1024 * 1024


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("img") / "base.img"
    with image.open("wb") as f:
        block = os.urandom(1 << 20)
        for i in range(IMAGE_BYTES >> 20):
            f.write(hashlib.sha256(block + bytes([i % 256])).digest() * (1 << 15))
    return image


@pytest.fixture
def farm(tmp_path: Path, sqlite_url: str, base_image: Path) -> Iterator[tuple[RunningNode, str, Path]]:
    image = base_image
    node = start_node(tmp_path, "n1", sqlite_url)
    try:
        admin(sqlite_url, "vdisk", "add", "base", "--file", str(image), "--no-copy", config=node.config)
        admin(sqlite_url, "device", "add", "--mac", MAC, "--name", "t1", "--vdisk", "base")
        admin(sqlite_url, "bootstrap", "configure", "--server", "n1")
        yield node, sqlite_url, image
    finally:
        node.stop()


def login(node: RunningNode, deadline_s: float = 10) -> dict[str, object]:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return node.get_json(f"/boot.json?mac={MAC.replace(':', '%3A')}")
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


def test_token_export_read_by_real_clients(farm: tuple[RunningNode, str, Path], tmp_path: Path) -> None:
    node, db_url, image = farm
    answer = login(node)
    assert answer["server"] == "n1" and answer["nbd_port"] == node.nbd_port
    uri = f"nbd://127.0.0.1:{node.nbd_port}/{answer['export']}"
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True, text=True,
                                     timeout=30).stdout)
    assert info["exports"][0]["export-size"] == IMAGE_BYTES
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True, info
    out = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
    assert sha256(out) == sha256(image)


def test_writes_land_in_the_write_cache_and_base_is_untouched(farm: tuple[RunningNode, str, Path]) -> None:
    node, db_url, image = farm
    before, mtime = sha256(image), image.stat().st_mtime_ns
    uri = f"nbd://127.0.0.1:{node.nbd_port}/{login(node)['export']}"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4096 65536", uri], check=True,
                   capture_output=True, timeout=30)
    read = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 4096 65536", uri], check=True,
                          capture_output=True, text=True, timeout=30)
    assert "Pattern verification failed" not in read.stdout + read.stderr
    assert sha256(image) == before and image.stat().st_mtime_ns == mtime
    caches = list((node.config.parent / "n1" / "store" / "writecache").glob("*.cow"))
    assert len(caches) == 1


def test_bad_tokens_are_unknown_exports(farm: tuple[RunningNode, str, Path]) -> None:
    node, _db, _image = farm
    token = str(login(node)["export"])
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for name in (forged, "base.x", "../../etc/passwd", "x" * 600):
        res = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{node.nbd_port}/{name}"], capture_output=True,
                             text=True, timeout=30)
        assert res.returncode != 0
    # the admin inspection path: a vDisk by name, from loopback, read-only
    info = subprocess.run(["nbdinfo", "--json", f"nbd://127.0.0.1:{node.nbd_port}/base"], capture_output=True,
                          text=True, timeout=30, check=True)
    export = json.loads(info.stdout)["exports"][0]
    assert export["is_read_only"] is True


def test_session_is_recorded_with_bytes(farm: tuple[RunningNode, str, Path], tmp_path: Path) -> None:
    node, db_url, _image = farm
    uri = f"nbd://127.0.0.1:{node.nbd_port}/{login(node)['export']}"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 1M", uri], check=True, capture_output=True, timeout=30)
    engine = create_engine(db_url)
    row = None
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with engine.connect() as conn:
            row = conn.execute(text("select bytes_read, last_io_at, ended_at from stream_sessions")).first()
        if row is not None and row[0] >= 1 << 20:
            break
        time.sleep(0.3)
    engine.dispose()
    assert row is not None and row[0] >= 1 << 20 and row[1] is not None and row[2] is None
    servers = json.loads(admin(db_url, "server", "list", "--json"))
    assert servers[0]["state"] == "up" and servers[0]["load"] == 1
