"""pvsfarm's own store devices for `nbd_bench.py --device-factory`.

    --device-factory benchmarks.nbd_devices:empty_cache   standard image, empty write cache
    --device-factory benchmarks.nbd_devices:half_cache    write cache holding 50% of the blocks
    --device-factory benchmarks.nbd_devices:base_image    the read-only base (device-ram cache type)

The connections of one server process share one device (as a target's
connections do in the node, through `SharedDevice`); worker processes attach to
it (`handoff_spec`). The cache is built once per server process and kept open
between connections: a node re-opens a session's existing cache cheaply
(`open_existing`), while building this one writes 512 MiB, which the first
connection of every test used to pay for. Cached blocks are written with the
base's own bytes so the benchmark's checksum still holds.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile

from pvsfarm.store import BaseImage, SharedDevice, WriteCache, read_bytes

_shared: dict[str, SharedDevice] = {}
_kept: list[object] = []  # one handle per device, never closed: the device outlives connections


def _shared_device(key: str, make) -> object:  # type: ignore[no-untyped-def]
    shared = _shared.get(key)
    if shared is None or shared.device is None:
        shared = _shared[key] = SharedDevice(make())
        _kept.append(shared.handle())
    return shared.handle()


def base_image(image: str, read_only: bool) -> object:
    return BaseImage(image)


def _remove_at_exit(path: str) -> None:
    """The server removes its cache when it exits (SIGTERM included: nbd_serve returns from
    asyncio.run). Workers re-open the cache by path, so it cannot be unlinked while serving.
    Without this every benchmark run left 0.5 GiB files in /tmp (298 of them, 19 GB, here)."""
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    atexit.register(remove)


def _cache(image: str, fraction_every: int) -> WriteCache:
    path = os.path.join(tempfile.gettempdir(), f"nbdbench-{os.getpid()}.cow")
    _remove_at_exit(path)
    cache = WriteCache.create(image, path)
    if fraction_every:
        base = BaseImage(image)
        block = cache.block_size
        for offset in range(0, cache.size_bytes, block * fraction_every):
            n = min(block, cache.size_bytes - offset)
            cache.pwrite(offset, read_bytes(base, offset, n), False)
        base.close()
        cache.flush()  # steady state: no writeback of the build competing with the timed reads
    return cache


def empty_cache(image: str, read_only: bool) -> object:
    return _shared_device("empty", lambda: _cache(image, 0))


def half_cache(image: str, read_only: bool) -> object:
    return _shared_device("half", lambda: _cache(image, 2))
