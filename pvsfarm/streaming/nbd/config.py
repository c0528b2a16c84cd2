"""Tunables of the NBD server (units in the names, as STYLE.md asks)."""

from __future__ import annotations

from dataclasses import dataclass

from pvsfarm.streaming.nbd.session import DEFAULT_MAX_OPTION_BYTES, DEFAULT_MAX_REQUEST_BYTES

TCP_CONGESTION = "cubic"
"""Default congestion control of NBD connections: Linux's own default, loss-based.  A
farm streams vDisks on a LAN, where BBR's gains (lossy, deep-buffered WAN paths) do
not apply but its cost does: without the ``fq`` qdisc, BBR paces inside TCP with a
timer per burst.  This machine runs BBR system-wide (qdisc ``noqueue`` on lo); with it,
sendfile replies, which leave faster than copied ones, were slowed most: qemu-img
convert 0.76x nbdkit, nbdcopy 1 connection 1.09x; with cubic on pvsfarm's sockets
1.14x and 1.70x (benchmarks/nbd_bench.py, paired medians, nbdkit on the system's BBR
in both runs)."""


@dataclass(frozen=True, slots=True)
class NbdConfig:
    """Tunables of the NBD server."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Largest READ/WRITE accepted (advertised as NBD_INFO_BLOCK_SIZE maximum)."""
    max_option_bytes: int = DEFAULT_MAX_OPTION_BYTES
    """Longer option data during the handshake closes the connection."""
    flush_bytes: int = 256 * 2**10
    """Reply bytes batched per ``writelines`` (RESULTS.md 1a: 256 KiB; 4 MiB was 4x slower)."""
    sendfile_min_bytes: int = 128 * 2**10
    """READs at least this long try raw ``os.sendfile``; 0 disables it."""
    write_high_water_bytes: int = 0
    """Transport high-water mark; 0 keeps the event loop's default (64 KiB)."""
    send_buffer_bytes: int = 4 * 2**20
    """SO_SNDBUF of each connection (the kernel doubles it and caps it at
    net.core.wmem_max); 0 keeps the kernel's autotuning.  qemu-img convert (2 MiB reads,
    8 in flight) took 0.52-0.64 s per GiB with autotuning here and 0.42-0.45 s with
    4 MiB: the reply stalled on a full socket buffer mid-sendfile."""
    notsent_lowat_bytes: int = 4 * 2**20
    """TCP_NOTSENT_LOWAT of each connection: at most this much data waits unsent in the
    socket (the rest of a reply waits in the worker until the client has taken some);
    0 keeps the system's (net.ipv4.tcp_notsent_lowat, unlimited by default).  Without
    it, qemu-img convert (2 MiB reads, sendfile) ran 1.9-4.4 GB/s from run to run here,
    the slow runs with the kernel's ksoftirqd doing the loopback's receive work
    (14-17 of its ticks against 4-5 per run); with 4 MiB, 3.5-3.7 GB/s, and nbdcopy with 1
    and 8 connections unchanged (benchmarks/nbd_bench.py, 5 rounds; 256 KiB cost 13 %
    with 8 connections)."""
    busy_poll_us: int = 50
    """How long a worker process spins for a client's next request while none of its
    other connections has input (busypoll.py); 0 = never spin."""
    tcp_congestion: str = TCP_CONGESTION
    """TCP congestion control of each connection (``TCP_CONGESTION``); "" keeps the
    system's (net.ipv4.tcp_congestion_control).  See ``TCP_CONGESTION``."""
