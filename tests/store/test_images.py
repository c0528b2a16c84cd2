from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.store.helpers import REPO_ROOT, MakeBase, pattern
from pvsfarm.errors import Conflict, StoreError
from pvsfarm.store import BaseImage, PrivateImage, read_bytes

HOLDER = """
import sys
from pvsfarm.store import PrivateImage
image = PrivateImage(sys.argv[1], name="win10", owner="node-b target 52:54:00:00:00:01")
print("ready", flush=True)
sys.stdin.read()
"""


def test_base_image_is_one_extent_of_a_read_only_fd(make_base: MakeBase) -> None:
    path = make_base(8192)
    with BaseImage(path) as base:
        assert (base.size_bytes, base.read_only, base.can_multi_conn) == (8192, True, True)
        [extent] = base.read_extents(512, 4096)
        assert (extent.fd, extent.file_offset, extent.length) == (base.fd, 512, 4096)
        assert read_bytes(base, 100, 50) == pattern(8192)[100:150]
        assert base.read_extents(8192, 0) == []
        with pytest.raises(OSError):
            os.pwrite(base.fd, b"x", 0)


@pytest.mark.parametrize("size", [0, 511, 4097])
def test_sizes_not_a_multiple_of_512_are_rejected(make_base: MakeBase, size: int) -> None:
    path = make_base(size)
    with pytest.raises(StoreError, match="multiple of 512"):
        BaseImage(path)
    with pytest.raises(StoreError, match="multiple of 512"):
        PrivateImage(path)


def test_missing_file_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        BaseImage(tmp_path / "nope.vhd")


@pytest.mark.parametrize("call", [
    lambda d: d.pwrite(0, b"x" * 512, False),
    lambda d: d.trim(0, 512),
    lambda d: d.write_zeroes(0, 512),
])
def test_base_image_refuses_writes(make_base: MakeBase, call) -> None:
    with BaseImage(make_base(1024)) as base:
        with pytest.raises(StoreError, match="read-only"):
            call(base)
        base.flush()


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, 1025), (1024, 1)])
def test_out_of_range_requests_are_refused(make_base: MakeBase, offset: int, length: int) -> None:
    with BaseImage(make_base(1024)) as base:
        with pytest.raises(StoreError, match="outside"):
            base.read_extents(offset, length)


def test_private_image_reads_and_writes_the_file(make_base: MakeBase) -> None:
    path = make_base(4096)
    with PrivateImage(path) as image:
        assert (image.read_only, image.can_multi_conn) == (False, True)
        image.pwrite(1000, b"hello", fua=True)
        image.write_zeroes(2048, 1024)
        image.trim(3584, 512)
        image.flush()
        expected = bytearray(pattern(4096))
        expected[1000:1005] = b"hello"
        expected[2048:3072] = bytes(1024)
        expected[3584:4096] = bytes(512)
        assert read_bytes(image, 0, 4096) == expected
    assert path.read_bytes() == expected
    assert os.path.getsize(path) == 4096


def test_private_image_is_exclusive_within_a_process(make_base: MakeBase) -> None:
    path = make_base(1024)
    with PrivateImage(path, name="win10", owner="node-a target t1"):
        with pytest.raises(Conflict, match="'win10' is a private image already opened by node-a target t1"):
            PrivateImage(path, name="win10")
        with pytest.raises(Conflict):
            BaseImage(path)
    with PrivateImage(path):  # released on close
        pass


def test_private_image_refused_while_streamed_as_a_base(make_base: MakeBase) -> None:
    path = make_base(1024)
    with BaseImage(path), BaseImage(path):
        with pytest.raises(Conflict, match="private image already opened"):
            PrivateImage(path, name="win10")


def test_private_image_is_exclusive_across_processes_until_kill_9(make_base: MakeBase) -> None:
    path = make_base(1024)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with pytest.raises(Conflict, match="already opened by node-b target 52:54:00:00:00:01"):
            PrivateImage(path, name="win10")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with PrivateImage(path, owner="node-a") as image:  # the kernel dropped the dead holder's lock
        image.pwrite(0, b"a" * 512, fua=False)
