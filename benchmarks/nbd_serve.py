#!/usr/bin/env python3
"""Serve one image with pvsfarm's NBD server (benchmark helper, run by nbd_bench.py).

usage: nbd_serve.py IMAGE [--port 10809] [--host 127.0.0.1] [--name ''] [--writable]
                    [--device-factory MODULE:FUNC | --overlay] [--no-uvloop] [--workers N]
                    [--flush-kib 256] [--sendfile-min-kib 128] [--high-water-kib 0]

Connections are handed to ``--workers`` worker processes after the handshake (default:
one per CPU), through the same WorkerPool the node uses for ``nbd.workers``.

``--device-factory MODULE:FUNC`` calls ``FUNC(image_path, read_only) -> BlockDevice``
once per connection (the store's write-cache device plugs in here).  ``--overlay`` uses
:class:`HalfOverlayDevice` below: every other block is read from a second file, as a
stand-in for a write cache holding 50 % of the blocks, until the store lands.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import shutil
import signal
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pvsfarm.streaming.nbd import (  # noqa: E402
    BlockDevice,
    DictResolver,
    Extent,
    FileDevice,
    NbdConfig,
    install_uvloop,
    start_nbd_server,
)
from pvsfarm.errors import ConfigError  # noqa: E402
from pvsfarm.streaming.nbd.handoff import WorkerPool  # noqa: E402
from pvsfarm.streaming.nbd.server import check_tcp_congestion  # noqa: E402


class HalfOverlayDevice(FileDevice):
    """Read-only stand-in for a 50 %-populated write cache: odd blocks of ``block_bytes``
    come from ``<image>.overlay`` (a byte-identical copy, so checksums still match),
    even blocks from the base image, so reads return two extents per block pair."""

    handoff_spec = None  # two files: served in the process that opened it

    def __init__(self, path: str, read_only: bool = True, block_bytes: int = 64 * 1024) -> None:
        super().__init__(path, read_only=True)
        overlay = path + ".overlay"
        if not os.path.exists(overlay) or os.path.getsize(overlay) != self.size_bytes:
            shutil.copyfile(path, overlay)
        self.overlay_fd = os.open(overlay, os.O_RDONLY | os.O_CLOEXEC)
        self.block_bytes = block_bytes

    def read_extents(self, offset: int, length: int) -> list[Extent]:
        out, end, bs = [], offset + length, self.block_bytes
        while offset < end:
            stop = min(end, (offset // bs + 1) * bs)
            fd = self.overlay_fd if (offset // bs) % 2 else self.fd
            out.append(Extent(fd, offset, stop - offset))
            offset = stop
        return out

    def close(self) -> None:
        os.close(self.overlay_fd)
        super().close()


def load_factory(spec: str) -> Callable[[str, bool], BlockDevice]:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


async def serve(args: argparse.Namespace) -> None:
    if args.device_factory:
        factory = load_factory(args.device_factory)
    elif args.overlay:
        factory = HalfOverlayDevice
    else:
        factory = FileDevice
    read_only = not args.writable
    # build the device before listening: a write cache holding 50% of the blocks writes
    # 512 MiB, which the first timed test would otherwise pay (nbd_devices keeps it open)
    factory(args.image, read_only).close()
    resolver = DictResolver({args.name: lambda: factory(args.image, read_only)})
    config = NbdConfig(flush_bytes=args.flush_kib * 1024, sendfile_min_bytes=args.sendfile_min_kib * 1024,
                       write_high_water_bytes=args.high_water_kib * 1024, busy_poll_us=args.busy_poll_us,
                       send_buffer_bytes=args.send_buffer_kib * 1024, tcp_congestion=args.tcp_congestion,
                       notsent_lowat_bytes=args.notsent_lowat_kib * 1024)
    try:
        check_tcp_congestion(config.tcp_congestion)  # before any worker starts, as the node does
    except ConfigError as exc:
        sys.exit(f"nbd_serve: {exc}")
    pool = WorkerPool(args.workers, config) if args.workers > 0 else None
    if pool is not None:
        pool.start()
        if not await pool.wait_ready():
            sys.exit("nbd workers did not start")
    server = await start_nbd_server(resolver, args.host, args.port, config=config, pool=pool)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {server.sockets[0].getsockname()} loop={type(loop).__module__}", flush=True)
    await stop.wait()
    server.close()
    if pool is not None:
        print(f"busy polling: {pool.busy_poll_stats()}", file=sys.stderr, flush=True)
        pool.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=10809)
    p.add_argument("--name", default="")
    p.add_argument("--writable", action="store_true")
    p.add_argument("--device-factory", default="")
    p.add_argument("--overlay", action="store_true")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--flush-kib", type=int, default=256)
    p.add_argument("--sendfile-min-kib", type=int, default=128)
    p.add_argument("--high-water-kib", type=int, default=0)
    p.add_argument("--send-buffer-kib", type=int, default=NbdConfig().send_buffer_bytes // 1024,
                   help="SO_SNDBUF of each connection (nbd.send_buffer_bytes; 0: kernel autotuning)")
    p.add_argument("--notsent-lowat-kib", type=int, default=NbdConfig().notsent_lowat_bytes // 1024,
                   help="TCP_NOTSENT_LOWAT of each connection (nbd.notsent_lowat_bytes; 0: the system's)")
    p.add_argument("--busy-poll-us", type=int, default=NbdConfig().busy_poll_us,
                   help="how long a worker spins for the next request (nbd.busy_poll_us; 0: never)")
    p.add_argument("--tcp-congestion", default=NbdConfig().tcp_congestion,
                   help="congestion control of each connection (nbd.tcp_congestion; '': the system's)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="NBD worker processes connections are handed to after the handshake, as the"
                        " node's nbd.workers (0: serve everything in this process)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.no_uvloop and not install_uvloop():
        sys.exit("uvloop is not installed (pass --no-uvloop to use stock asyncio)")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
