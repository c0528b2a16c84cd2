"""Hand NBD connections over to worker processes after the handshake (main side).

One Python process uses one core; ``nbd.workers`` worker processes
(``python -m pvsfarm.streaming.nbd.worker``) let transmission use them all
(benchmarks/nbd_bench.py). The main process still accepts every connection and
runs the handshake, token checks and ``open_export`` (which, for a write cache
or private image, holds the flock that fences other nodes off). Once the GO
reply is on the wire, it sends a dup of the socket with SCM_RIGHTS over an
AF_UNIX SOCK_SEQPACKET control socket to the least-loaded worker, with a small
JSON spec (connection id, how to re-open the device, the export's facts, any
bytes already received), then closes its own copy. The worker re-opens the
device (``pvsfarm.store.handoff.attach``), shares it among the connections of
one session and serves them.

Control messages, one JSON object per datagram:
  main -> worker  ``conn`` (+ the socket fd), ``drop`` (close one connection), ``ping`` (~1 s)
  worker -> main  ``ready`` (once, when it serves), ``io`` (per-connection byte totals,
                  ~0.5 s), ``closed``
Connections go only to ready workers; with none ready (starting, or failing to start)
the main process serves them itself.
Main keeps each handed-over export open until the worker reports it closed,
feeds the journal (``on_io``) and releases it (``release_export``).

Workers never outlive their node's liveness: they exit, closing every
connection, when the control socket closes (main died, even by kill -9; they
also have PR_SET_PDEATHSIG=SIGKILL) or when no ping came for
``ping_timeout_s`` (main hung, e.g. SIGSTOP: the farm calls a node dead after
``dead_after_s`` = 5 s and may take over its write caches). Main restarts a
worker that died and releases that worker's connections.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from pvsfarm.streaming.nbd.backend import OpenedExport, release_export
from pvsfarm.streaming.nbd.busypoll import COUNTS
from pvsfarm.streaming.nbd.config import NbdConfig
from pvsfarm.streaming.nbd.session import ExportInfo

log = logging.getLogger("pvsfarm.streaming.nbd.handoff")

PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 3.0
"""Below the farm's dead_after_s (5 s): a hung node's workers stop before others take over."""
MAX_MESSAGE_BYTES = 64 * 2**10
RESTART_DELAY_S = 0.5


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)


@dataclass(eq=False)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ctl: socket.socket
    conns: set[int] = field(default_factory=set)
    ready: bool = False
    dead: bool = False
    polled: dict[str, int] = field(default_factory=dict)  # the worker's busy-poll counts so far


class WorkerPool:
    """The main process's side: spawn workers, hand connections over, account and release."""

    def __init__(self, workers: int, config: NbdConfig | None = None, *,
                 ping_timeout_s: float = PING_TIMEOUT_S) -> None:
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self._n = workers
        self._config = config or NbdConfig()
        self._ping_timeout_s = ping_timeout_s
        self._workers: list[_Worker | None] = [None] * workers
        self._exports: dict[int, tuple[_Worker, OpenedExport]] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._closed = False
        self._polled_before = dict.fromkeys(COUNTS, 0)  # counts of workers that died or were replaced

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers; call from the running event loop's thread (PDEATHSIG
        follows the spawning thread)."""
        self._loop = asyncio.get_running_loop()
        for i in range(self._n):
            self._spawn(i)
        self._pinger = self._loop.call_later(PING_INTERVAL_S, self._ping)

    async def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """Wait until every worker serves (False on timeout: the rest are used as they come)."""
        assert self._loop is not None
        end = self._loop.time() + timeout_s
        while len(self.pids()) < self._n:
            if self._loop.time() > end:
                return False
            await asyncio.sleep(0.02)
        return True

    def close(self) -> None:
        """Stop every worker (their connections close) and release the exports."""
        self._closed = True
        if self._pinger is not None:
            self._pinger.cancel()
        for w in self._workers:
            if w is not None:
                self._bury(w)
        for w in self._workers:
            if w is not None:
                try:
                    w.proc.wait(5)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()

    def pids(self) -> list[int]:
        """Pids of the workers that serve (ready and not known dead)."""
        return [w.proc.pid for w in self._workers if w is not None and w.ready and not w.dead]

    def connections(self) -> int:
        return len(self._exports)

    def busy_poll_stats(self) -> dict[str, int]:
        """Busy polling in the workers since the pool started (busypoll.py): spins that
        found the next request (hits), that timed out (misses), and waits skipped while a
        connection backed off.  Reported by each worker every 0.5 s."""
        totals = dict(self._polled_before)
        for w in self._workers:
            if w is not None:
                for key, n in w.polled.items():
                    totals[key] += n
        return totals

    def _spawn(self, index: int) -> None:
        assert self._loop is not None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = {"config": asdict(self._config), "ping_timeout_s": self._ping_timeout_s}
        cmd = [sys.executable, "-m", "pvsfarm.streaming.nbd.worker", "--control-fd", str(theirs.fileno()),
               "--parent-pid", str(os.getpid()), "--args", json.dumps(args)]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        mine.setblocking(False)
        worker = _Worker(index, proc, mine)
        old = self._workers[index]
        if old is not None:  # a replacement: keep what the dead worker had counted
            self._polled_before = {k: n + old.polled.get(k, 0) for k, n in self._polled_before.items()}
        self._workers[index] = worker
        self._loop.add_reader(mine.fileno(), self._readable, worker)

    def _bury(self, w: _Worker) -> None:
        """Forget a worker: its connections close with it, their exports are released."""
        if w.dead:
            return
        w.dead = True
        if self._loop is not None:
            self._loop.remove_reader(w.ctl.fileno())
        w.ctl.close()  # the worker sees EOF and exits, closing its connections
        for cid in sorted(w.conns):
            self._release(cid)
        w.conns.clear()

    def _died(self, w: _Worker) -> None:
        self._bury(w)
        if w.proc.poll() is None:
            w.proc.kill()
        if not self._closed and self._loop is not None:
            log.warning("nbd worker %d (pid %d) stopped; restarting it", w.index, w.proc.pid)
            self._loop.call_later(RESTART_DELAY_S, self._respawn, w)

    def _respawn(self, w: _Worker) -> None:
        try:
            w.proc.wait(1)
        except subprocess.TimeoutExpired:
            pass
        if not self._closed and self._workers[w.index] is w:
            self._spawn(w.index)

    # --- main -> worker -------------------------------------------------------------

    def hand_off(self, sock_fd: int, device_spec: dict[str, Any], info: ExportInfo, pending: bytes,
                 opened: OpenedExport, structured: bool = False) -> int | None:
        """Send connection ``sock_fd`` to a worker; its id, or None (then keep serving here).
        ``structured``: the handshake negotiated structured replies."""
        live = [w for w in self._workers if w is not None and w.ready and not w.dead]
        if self._closed or not live or len(pending) > MAX_MESSAGE_BYTES // 4:
            return None
        worker = min(live, key=lambda w: (len(w.conns), w.index))
        cid = next(self._ids)
        msg = {"op": "conn", "cid": cid, "device": device_spec, "export": asdict(info),
               "pending": pending.hex(), "structured": structured}
        try:
            socket.send_fds(worker.ctl, [encode(msg)], [sock_fd])
        except OSError as exc:  # full (worker stuck) or gone: serve it here
            log.warning("nbd worker %d: handoff failed (%s); serving in the main process", worker.index, exc)
            return None
        worker.conns.add(cid)
        self._exports[cid] = (worker, opened)
        return cid

    def drop(self, cid: int) -> None:
        """Close connection ``cid`` (e.g. drain); its export is released when the worker confirms."""
        entry = self._exports.get(cid)
        if entry is not None:
            self._send(entry[0], {"op": "drop", "cid": cid})

    def _ping(self) -> None:
        for w in self._workers:
            if w is not None and not w.dead:
                self._send(w, {"op": "ping"})
        if not self._closed and self._loop is not None:
            self._pinger = self._loop.call_later(PING_INTERVAL_S, self._ping)

    def _send(self, w: _Worker, msg: dict[str, Any]) -> None:
        try:
            w.ctl.send(encode(msg))
        except BlockingIOError:
            log.warning("nbd worker %d: control socket full, message dropped", w.index)
        except OSError:
            self._died(w)

    # --- worker -> main -------------------------------------------------------------

    def _readable(self, w: _Worker) -> None:
        while not w.dead:
            try:
                raw = w.ctl.recv(MAX_MESSAGE_BYTES)
            except BlockingIOError:
                return
            except OSError:
                raw = b""
            if not raw:
                self._died(w)
                return
            try:
                self._handle(w, decode(raw))
            except Exception:  # noqa: BLE001 - one bad report must not stop the node
                log.exception("nbd worker %d: bad control message", w.index)

    def _handle(self, w: _Worker, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "ready":
            w.ready = True
        elif op == "io":
            for cid, nread, nwritten in msg["io"]:
                entry = self._exports.get(cid)
                if entry is not None and entry[1].on_io is not None:
                    entry[1].on_io(nread, nwritten)
        elif op == "poll":
            w.polled = {key: int(msg[key]) for key in COUNTS}
        elif op == "closed":
            for cid in msg["cids"]:
                w.conns.discard(cid)
                self._release(cid)

    def _release(self, cid: int) -> None:
        entry = self._exports.pop(cid, None)
        if entry is not None:
            try:
                release_export(entry[1])
            except Exception:  # noqa: BLE001
                log.exception("nbd connection %d: closing the export failed", cid)
