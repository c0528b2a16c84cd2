"""An NBD worker process: serves the transmission phase of connections its node hands over.

Started by :class:`~pvsfarm.streaming.nbd.handoff.WorkerPool` as
``python -m pvsfarm.streaming.nbd.worker --control-fd N --parent-pid P --args JSON``;
the message protocol and the liveness rules are in ``handoff.py``. The connections
of one session (same device spec) share one attached device, as in the main process.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from pvsfarm.store.device import SharedDevice
from pvsfarm.store.handoff import attach
from pvsfarm.streaming.nbd.backend import OpenedExport, release_export
from pvsfarm.streaming.nbd.busypoll import BusyPoller
from pvsfarm.streaming.nbd.config import NbdConfig
from pvsfarm.streaming.nbd.handoff import MAX_MESSAGE_BYTES, decode, encode
from pvsfarm.streaming.nbd.server import Handed, NbdServerProtocol, install_uvloop
from pvsfarm.streaming.nbd.session import ExportInfo

log = logging.getLogger("pvsfarm.streaming.nbd.worker")

IO_REPORT_S = 0.5
_PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, ctl: socket.socket, config: NbdConfig, ping_timeout_s: float) -> None:
        self._ctl = ctl
        self._config = config
        self._ping_timeout_s = ping_timeout_s
        self._loop = asyncio.get_running_loop()
        self._devices: dict[str, SharedDevice] = {}
        self._conns: dict[int, NbdServerProtocol | None] = {}
        self._io: dict[int, list[int]] = {}
        self._closed: list[int] = []
        self._last_heard = self._loop.time()
        self._poller = BusyPoller(config.busy_poll_us / 1e6) if config.busy_poll_us > 0 else None
        self._polled: dict[str, int] = {}  # the poller's counts last reported
        self.done = asyncio.Event()

    def start(self) -> None:
        self._ctl.setblocking(False)
        self._loop.add_reader(self._ctl.fileno(), self._readable)
        if self._poller is not None:
            self._poller.add(self._ctl.fileno())  # a control message ends any spin
        self._loop.call_later(IO_REPORT_S, self._report)
        self._send({"op": "ready"})

    def stop(self, why: str) -> None:
        """Close every connection at once and end the process's main loop."""
        if self.done.is_set():
            return
        log.info("nbd worker %d stopping: %s", os.getpid(), why)
        for proto in self._conns.values():
            if proto is not None:
                proto.abort()
        self.done.set()

    # --- control socket -------------------------------------------------------------

    def _readable(self) -> None:
        while not self.done.is_set():
            try:
                raw, fds, _flags, _addr = socket.recv_fds(self._ctl, MAX_MESSAGE_BYTES, 4)
            except BlockingIOError:
                return
            except OSError as exc:
                self.stop(f"control socket: {exc}")
                return
            if not raw:
                for fd in fds:
                    os.close(fd)
                self.stop("the node closed the control socket")
                return
            self._last_heard = self._loop.time()
            self._handle(decode(raw), fds)

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "conn" and fds:
            for extra in fds[1:]:
                os.close(extra)
            self._accept(msg, fds[0])
        elif op == "drop":
            proto = self._conns.get(msg["cid"])
            if proto is not None:
                proto.drop()
        else:
            for fd in fds:
                os.close(fd)

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._ctl.send(encode(msg))
        except BlockingIOError:
            log.warning("control socket full; report dropped")
        except OSError as exc:
            self.stop(f"control socket: {exc}")

    def _report(self) -> None:
        if self.done.is_set():
            return
        if self._loop.time() - self._last_heard > self._ping_timeout_s:
            self.stop(f"no word from the node for {self._ping_timeout_s} s")
            return
        self._flush_reports()
        self._loop.call_later(IO_REPORT_S, self._report)

    def _flush_reports(self) -> None:
        poller = self._poller
        if poller is not None and (counts := poller.counts()) != self._polled:
            self._polled = counts
            self._send({"op": "poll", **counts})
        if self._io:
            io, self._io = self._io, {}
            self._send({"op": "io", "io": [[cid, r, w] for cid, (r, w) in io.items()]})
        if self._closed:
            closed, self._closed = self._closed, []
            self._send({"op": "closed", "cids": closed})

    # --- connections ----------------------------------------------------------------

    def _accept(self, msg: dict[str, Any], fd: int) -> None:
        cid = msg["cid"]
        sock = socket.socket(fileno=fd)
        try:
            opened = self._open(cid, msg["device"])
        except Exception as exc:  # noqa: BLE001 - this connection fails, the worker lives
            log.warning("nbd connection %d: cannot attach its device: %s", cid, exc)
            sock.close()
            self._closed.append(cid)
            self._flush_reports()
            return
        handed = Handed(opened, ExportInfo(**msg["export"]), bytes.fromhex(msg["pending"]),
                        bool(msg.get("structured")))
        self._conns[cid] = None
        sock.setblocking(False)
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(
                lambda: NbdServerProtocol(None, self._config, handed=handed, poller=self._poller), sock))
        task.add_done_callback(lambda t: self._accepted(cid, t, sock, opened))

    def _accepted(self, cid: int, task: asyncio.Task, sock: socket.socket, opened: OpenedExport) -> None:
        if task.cancelled() or task.exception() is not None:
            log.warning("nbd connection %d: %s", cid, task.exception() if not task.cancelled() else "cancelled")
            sock.close()
            self._conns.pop(cid, None)
            release_export(opened)
            return
        _transport, proto = task.result()
        if cid in self._conns:
            self._conns[cid] = proto  # type: ignore[assignment]
        if self.done.is_set():
            proto.abort()  # type: ignore[attr-defined]

    def _open(self, cid: int, spec: dict[str, Any]) -> OpenedExport:
        key = json.dumps(spec, sort_keys=True)
        shared = self._devices.get(key)
        if shared is None or shared.device is None:
            shared = self._devices[key] = SharedDevice(attach(spec))
        handle = shared.handle()

        def on_io(nread: int, nwritten: int) -> None:
            tot = self._io.get(cid)
            if tot is None:
                self._io[cid] = [nread, nwritten]
            else:
                tot[0] += nread
                tot[1] += nwritten

        def on_close() -> None:
            self._conns.pop(cid, None)
            if shared.device is None and self._devices.get(key) is shared:
                del self._devices[key]
            self._closed.append(cid)
            self._loop.call_soon(self._flush_reports)

        return OpenedExport(handle, "", on_io, on_close)


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG=SIGKILL, then check the parent did not die before it was set."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the control socket's EOF still stops us
    if os.getppid() != parent:
        os._exit(1)


async def _serve(args: argparse.Namespace) -> None:
    extra = json.loads(args.args)
    ctl = socket.socket(fileno=args.control_fd)
    worker = Worker(ctl, NbdConfig(**extra["config"]), float(extra["ping_timeout_s"]))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop, f"signal {sig}")
    worker.start()
    await worker.done.wait()
    await asyncio.sleep(0)  # let the aborted transports run connection_lost


def main() -> None:
    p = argparse.ArgumentParser(description="pvsfarm NBD worker (started by the node)")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--args", default='{"config": {}, "ping_timeout_s": 3.0}')
    args = p.parse_args()
    _die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.WARNING, format="nbd-worker %(process)d: %(levelname)s %(message)s")
    install_uvloop()
    asyncio.run(_serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
