"""Bounded busy polling for an NBD worker: wait for a client's next request by spinning.

Why: at queue depth 1 every request is a round trip, and on a VM without halt polling
(this machine: ``guest_halt_poll_ns=0``) waking a halted vCPU costs tens of µs, more
than serving the request.  If the worker spins for a few tens of µs after its reply,
the next request is usually there before the vCPU halts.  Measured here (fio nbd
randread 4K QD1, one connection, empty write cache): 10-11k IOPS blocking in the event
loop, 18k spinning through event-loop iterations, and more with this poller, which
spins on one ``epoll`` of all the worker's connections (no event-loop iteration per spin).

Rules that keep it bounded and fair (the kernel's ``net.core.busy_poll`` idea):
  * it spins only while no other connection of the worker (nor the control socket) has
    input: anything else ready ends the spin and the event loop serves it;
  * at most ``spin_s`` per wait, and ``sched_yield()`` between polls, so a client
    process runnable on the same CPU is not kept waiting;
  * a connection spins only when everything it owes is on the wire (the caller checks);
  * a spin that timed out (a client across a real network, or a quiet one) makes that
    connection skip the next 1, 2, 4 ... 64 waits (`pvsfarm.backoff`, as TFTP transfers
    do), so CPU is spent where spinning pays.
``spin_s`` comes from ``nbd.busy_poll_us`` (0 turns it off).
"""

from __future__ import annotations

import os
import select
import time

from pvsfarm.backoff import SpinBackoff

_perf = time.perf_counter
READ_BYTES = 256 * 2**10


class BusyPoller:
    """One per worker process: an epoll set of every connection it serves."""

    def __init__(self, spin_s: float) -> None:
        self.spin_s = spin_s
        self._ep = select.epoll()
        self.hits = self.misses = self.skipped = 0
        self._backoff: dict[int, SpinBackoff] = {}  # connections whose spins timed out
        # one receive buffer for the whole worker (os.read(fd, 256 KiB) would mmap and
        # unmap per call; one per connection would cost 256 KiB of each idle connection)
        self._buf = [memoryview(bytearray(READ_BYTES))]

    def add(self, fd: int) -> None:
        self._ep.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        self._backoff.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass  # already closed: the kernel dropped it from the set

    def close(self) -> None:
        self._ep.close()

    def read(self, fd: int) -> bytes:
        """What ``fd`` has (b"" at EOF); OSError (EAGAIN included) as ``os.read``."""
        n = os.readv(fd, self._buf)
        return self._buf[0][:n].tobytes()

    def wait(self, fd: int) -> bool:
        """Spin until ``fd`` has input (True), or until something else is ready or
        the time is up (False: back to the event loop).  While ``fd`` backs off after
        timed-out spins, False at once."""
        backoff = self._backoff.get(fd)
        if backoff is not None and backoff.skipping():
            self.skipped += 1
            return False
        poll, yield_cpu = self._ep.poll, os.sched_yield
        deadline = _perf() + self.spin_s
        while True:
            ready = poll(0)
            if ready:
                for rfd, _ev in ready:
                    if rfd == fd:
                        self.hits += 1
                        if backoff is not None:
                            del self._backoff[fd]
                        return True
                return False
            if _perf() >= deadline:
                self.misses += 1
                if backoff is None:
                    backoff = self._backoff[fd] = SpinBackoff()
                backoff.timed_out()
                return False
            yield_cpu()
