"""Run the NBD server tests on both stock asyncio and uvloop (production runs uvloop)."""

from __future__ import annotations

import asyncio

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a declared dependency
    uvloop = None


def pytest_asyncio_loop_factories(config, item):  # type: ignore[no-untyped-def]
    factories = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None and item.path.name in ("test_nbd_server.py", "test_nbd_busypoll.py"):
        factories["uvloop"] = uvloop.new_event_loop
    return factories
