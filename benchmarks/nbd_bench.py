#!/usr/bin/env python3
"""Benchmark pvsfarm's NBD server against ``nbdkit file`` on the same image.

Measures, with every server up for a round and each test run on them back to back
(the order alternates between rounds; RESULTS.md method: compare within one run):
  seq_c1, seq_c8    nbdcopy --connections=N URI null:   (MB/s; 256 KiB requests)
  seq_qemu          qemu-img convert -n ... null-co     (MB/s)
  rand_qdD_cN       fio ioengine=nbd randread bs=4k iodepth=D numjobs=N (IOPS)
  idle_rss          server RSS growth with --idle-conns connections parked after GO
                    (KiB per connection)
and prints a table with medians, the pvsfarm/nbdkit ratio of the medians and the
median of the per-round ("paired") ratios, then the servers' CPU
(user + system, workers included) per GiB or per request: on loopback the clients
share the 2 CPUs, so this is what a node pays per unit of work whatever the client costs.

usage:
  python benchmarks/nbd_bench.py [--dir /tmp/pvsfarm-nbd-bench] [--size-mib 1024]
      [--rounds 3] [--fio-seconds 4] [--tests seq_c1,...] [--servers pvsfarm,nbdkit]
      [--idle-conns 200] [--overlay | --device-factory MODULE:FUNC] [--no-uvloop]
      [--serve-arg=--flush-kib=256 ...]
  pvsfarm hands connections to one worker process per CPU after the handshake (the
  node's nbd.workers default); --servers may also name pvsfarm-wN for N workers
  (pvsfarm-w0: everything in one process). nbdkit itself runs 16 threads.

Write-cache mode (for the lead, once the store lands): pass
``--device-factory pvsfarm.store.SOMETHING:FUNC`` where ``FUNC(image_path, read_only)``
returns a BlockDevice whose write cache holds 50 % of the blocks (byte-identical to the
base, so the checksum check still passes).  ``--overlay`` runs the built-in stand-in
(benchmarks/nbd_serve.py HalfOverlayDevice: odd 64 KiB blocks from a copy).  nbdkit
always serves the plain image, so the ratio then shows the overlay's cost.
Before every timed test the image (and a pvsfarm write cache) is read whole again:
this VM drops cached pages while idle (see ``warm``).
The first line says which TCP congestion control each server's connections run:
pvsfarm's follow nbd.tcp_congestion (default cubic; --serve-arg=--tcp-congestion= keeps
the system's), nbdkit's the system's.
Needs: nbdkit, libnbd-bin (nbdcopy), qemu-utils, fio (with its nbd engine), uvloop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pvsfarm.streaming.nbd import wire  # noqa: E402

ALL_TESTS = "seq_c1,seq_c8,seq_qemu,rand_qd1_c1,rand_qd32_c1,rand_qd1_c8,rand_qd32_c8,idle_rss"
UNITS = {"seq": "MB/s", "rand": "IOPS", "idle": "KiB/conn"}


def make_image(path: str, size: int) -> None:
    """Random-ish, fully allocated data (no sparse/zero shortcuts); reused if present."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    block = os.urandom(1 << 20)
    with open(path + ".tmp", "wb") as f:
        for i in range(size >> 20):
            f.write(i.to_bytes(8, "little") + block[8:])
    os.replace(path + ".tmp", path)


def warm(paths: list[str]) -> None:
    """Read ``paths`` whole, so the timed test finds them in the page cache.  This VM
    drops pages of cached files while idle with 20 GB free (fincore: a 1 GiB image
    lost ~1 % every 5 s), and a 4K read that misses waits ~100 µs for the disk: at
    queue depth 1 that decided pairs more than the servers did."""
    buf = bytearray(1 << 20)
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        except FileNotFoundError:
            pass


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server did not listen on {port}")


def start_server(kind: str, image: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """``kind`` is nbdkit, pvsfarm, or pvsfarm-wN (N processes sharing the port)."""
    port = free_port()
    if kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-r", "-p", str(port), "-i", "127.0.0.1", "file", image]
    else:
        cmd = [sys.executable, os.path.join(HERE, "nbd_serve.py"), image, "--port", str(port)]
        cmd += ["--no-uvloop"] if args.no_uvloop else []
        cmd += ["--overlay"] if args.overlay else []
        cmd += ["--device-factory", args.device_factory] if args.device_factory else []
        cmd += args.serve_arg
        if kind.startswith("pvsfarm-w"):
            cmd += ["--workers", kind[len("pvsfarm-w"):]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_port(port, proc)
    return proc, f"nbd://127.0.0.1:{port}/"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_fio(uri: str, qd: int, jobs: int, seconds: int) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            ["fio", "--name=r", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
             f"--iodepth={qd}", f"--numjobs={jobs}", "--time_based", f"--runtime={seconds}",
             "--group_reporting", "--output-format=json", f"--output={out.name}"],
            check=True, stdout=subprocess.DEVNULL)
        data = json.load(open(out.name))
    return sum(j["read"]["iops"] for j in data["jobs"])


def tree(pid: int) -> list[int]:
    """``pid`` and its direct children (worker processes)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return pids


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its direct children so far."""
    ticks = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` plus its direct children (worker processes)."""
    total = 0
    for p in tree(pid):
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total


def park_connection(port: int) -> socket.socket:
    """Open a connection and complete NBD_OPT_GO on the default export, then idle."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    recv_exact(s, wire.ServerGreeting.SIZE)
    s.sendall(wire.ClientFlags(wire.ClientFlag.FIXED_NEWSTYLE | wire.ClientFlag.NO_ZEROES).encode())
    s.sendall(wire.OptionRequest(wire.Opt.GO, wire.InfoRequest("", ()).encode()).encode())
    while True:
        rep, _ = wire.OptionReply.decode(recv_reply(s))
        if rep.reply_type == wire.Rep.ACK:
            return s
        if rep.reply_type & (1 << 31):
            raise RuntimeError(f"GO failed: {rep}")


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed")
        buf += chunk
    return buf


def recv_reply(s: socket.socket) -> bytes:
    hdr = recv_exact(s, wire.OptionReply.HEADER_SIZE)
    return hdr + recv_exact(s, int.from_bytes(hdr[16:20], "big"))


def idle_rss_per_conn(proc: subprocess.Popen, port: int, n: int) -> float:
    warm = [park_connection(port) for _ in range(4)]  # first connections pay one-off costs
    time.sleep(0.3)
    before = rss_kib(proc.pid)
    conns = [park_connection(port) for _ in range(n)]
    time.sleep(0.5)
    after = rss_kib(proc.pid)
    for s in conns + warm:
        s.close()
    return (after - before) / n


def measure(test: str, uri: str, proc: subprocess.Popen, size: int, args: argparse.Namespace) -> float:
    if test.startswith("seq_c"):
        return size / timed(["nbdcopy", f"--connections={test[5:]}", uri, "null:"]) / 1e6
    if test == "seq_qemu":
        return size / timed(["qemu-img", "convert", "-n", "-f", "raw", uri, "--target-image-opts",
                             f"driver=null-co,size={size}"]) / 1e6
    if test.startswith("rand_qd"):
        qd, jobs = test[7:].split("_c")
        return run_fio(uri, int(qd), int(jobs), args.fio_seconds)
    if test == "idle_rss":
        return idle_rss_per_conn(proc, int(uri.rsplit(":", 1)[1].strip("/")), args.idle_conns)
    raise SystemExit(f"unknown test {test}")


def verify(uri: str, digest: str) -> None:
    out = subprocess.run(["nbdcopy", uri, "-"], check=True, stdout=subprocess.PIPE).stdout
    if hashlib.sha256(out).hexdigest() != digest:
        raise SystemExit(f"{uri}: data differs from the image (sha256)")


def print_cpu_table(cpu: dict[str, dict[str, list[float]]], tests: list[str], servers: list[str]) -> None:
    """Server CPU (the process and its workers, user + system) per unit of work: what a
    node pays per byte or request whatever the client costs; nbdkit/pvsfarm > 1 means
    pvsfarm needs less.  Clock ticks are 10 ms, so seq figures are +-20 ms per GiB.  A
    worker's busy polling (nbd.busy_poll_us) counts as CPU: at QD1 it spends time the
    CPU would otherwise idle in, to answer sooner."""
    pv = [s for s in servers if s.startswith("pvsfarm")] if "nbdkit" in servers else []
    head = ["test", "unit"] + servers + [f"nbdkit/{s}" for s in pv]
    print("\nserver CPU per unit of work (lower is better)")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for t in tests:
        if t == "idle_rss":
            continue
        unit = "CPU ms/GiB" if t.startswith("seq") else "CPU us/request"
        med = {s: statistics.median(cpu[s][t]) for s in servers if cpu[s].get(t)}
        cells = [t, unit] + [f"{med[s]:,.1f}" if s in med else "-" for s in servers]
        cells += [f"{med['nbdkit'] / med[s]:.2f}x" if s in med and med.get("nbdkit") and med[s] else "-" for s in pv]
        print("| " + " | ".join(cells) + " |")


def print_table(results: dict[str, dict[str, list[float]]], tests: list[str], servers: list[str]) -> None:
    pv = [s for s in servers if s.startswith("pvsfarm")] if "nbdkit" in servers else []
    head = ["test", "unit"] + servers + [f"{s}/nbdkit" for s in pv] + [f"{s}/nbdkit paired" for s in pv]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for t in tests:
        cells = [t, UNITS[t.split("_")[0]]]
        med = {s: statistics.median(results[s][t]) for s in servers if results[s].get(t)}
        for s in servers:
            v = results[s].get(t, [])
            cells.append(f"{med[s]:,.0f} [{min(v):,.0f}-{max(v):,.0f}] n={len(v)}" if v else "-")
        for s in pv:
            if s in med and med.get("nbdkit") and med[s]:
                ratio = med[s] / med["nbdkit"]
                cells.append(f"{1 / ratio if t == 'idle_rss' else ratio:.2f}x")
            else:
                cells.append("-")
        for s in pv:  # the same round's pair: median [min-max] of the per-round ratios
            pairs = [a / b for a, b in zip(results[s].get(t, []), results["nbdkit"].get(t, [])) if a and b]
            pairs = [1 / r for r in pairs] if t == "idle_rss" else pairs
            cells.append(f"{statistics.median(pairs):.2f}x [{min(pairs):.2f}-{max(pairs):.2f}]" if pairs else "-")
        print("| " + " | ".join(cells) + " |")
    print("(ratio: of the medians; paired: median [min-max] of the ratios within each round, where the two\n"
          " servers ran the test back to back; idle_rss ratios are nbdkit/pvsfarm, > 1 means pvsfarm uses less)")


def tcp_setup(serve_args: list[str]) -> str:
    """Which TCP congestion control each side runs: the figures depend on it (BBR without
    the fq qdisc paces inside TCP, which slows the faster sender most; README, NBD)."""
    from pvsfarm.streaming.nbd.config import NbdConfig

    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            system = f.read().strip()
    except OSError:
        system = "unknown"
    try:
        qdisc = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True,
                               check=True).stdout.split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        qdisc = "unknown"
    ours = NbdConfig().tcp_congestion
    for arg in serve_args:
        if arg.startswith("--tcp-congestion="):
            ours = arg.split("=", 1)[1]
    return (f"# TCP congestion control: system {system} (qdisc on lo: {qdisc}); "
            f"pvsfarm's connections {ours or system} (nbd.tcp_congestion), nbdkit's {system}")


def main() -> None:
    p = argparse.ArgumentParser(description="pvsfarm vs nbdkit NBD benchmark")
    p.add_argument("--dir", default="/tmp/pvsfarm-nbd-bench")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fio-seconds", type=int, default=4)
    p.add_argument("--tests", default=ALL_TESTS)
    p.add_argument("--servers", default="pvsfarm,nbdkit")
    p.add_argument("--idle-conns", type=int, default=200)
    p.add_argument("--overlay", action="store_true")
    p.add_argument("--device-factory", default="")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--serve-arg", action="append", default=[], help="extra nbd_serve.py argument")
    args = p.parse_args()
    print(tcp_setup(args.serve_arg), flush=True)
    os.makedirs(args.dir, exist_ok=True)
    image, size = os.path.join(args.dir, "disk.img"), args.size_mib << 20
    make_image(image, size)
    digest = file_sha256(image)  # also warms the page cache
    tests, servers = args.tests.split(","), args.servers.split(",")
    results: dict[str, dict[str, list[float]]] = {s: {} for s in servers}
    cpu: dict[str, dict[str, list[float]]] = {s: {} for s in servers}
    for rnd in range(args.rounds):
        # Every server is up for the whole round and each test runs on them back to back,
        # in an order that alternates between rounds: the machine's drift (nbdkit's own
        # figures moved 20-30 % within an hour here) then hits both sides of a pair alike.
        running: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for server in servers:
                running[server] = start_server(server, image, args)
                if rnd == 0:
                    verify(running[server][1], digest)
            order = servers if rnd % 2 == 0 else servers[::-1]
            # the image, and the write cache of a pvsfarm server built by benchmarks/nbd_devices.py
            files = [image] + [os.path.join(tempfile.gettempdir(), f"nbdbench-{proc.pid}.cow")
                               for name, (proc, _) in running.items() if name.startswith("pvsfarm")]
            for test in tests:
                for server in order:
                    proc, uri = running[server]
                    warm(files)
                    before = cpu_s(proc.pid)
                    value = measure(test, uri, proc, size, args)
                    used = cpu_s(proc.pid) - before
                    results[server].setdefault(test, []).append(value)
                    if test.startswith("seq"):
                        cpu[server].setdefault(test, []).append(used * 1e3 / (size / 2**30))
                    elif test.startswith("rand") and value:
                        cpu[server].setdefault(test, []).append(used * 1e6 / (value * args.fio_seconds))
                    print(f"RAW\tnbd\t{server}\t{test}\t{UNITS[test.split('_')[0]]}\t{value:.1f}", flush=True)
        finally:
            for proc, _ in running.values():
                proc.terminate()
                proc.wait(10)
    print_table(results, tests, servers)
    print_cpu_table(cpu, tests, servers)


if __name__ == "__main__":
    main()
