"""TFTP throughput: pvsfarm (uvloop) vs tftpd-hpa vs atftpd (vs dnsmasq), same run.

Every server is started by this script on 127.0.0.1 (ephemeral ports; dnsmasq
only with ``--dnsmasq``, as it can only listen on port 69) and measured
round-robin (round 1: every server, round 2: ...), as in
shared/bench/RESULTS.md, so figures compare within one table only.

Tests (blksize 1468 = the Ethernet-MTU size PXE ROMs ask for):
* ``curl:FILE``        curl lock-step, MB/s from curl's time_total
* ``atftp:FILE``       atftp lock-step, MB/s from wall time
* ``atftp-w8:FILE``    atftp with windowsize 8 (RFC 7440; tftpd-hpa and dnsmasq
                       ignore the option and run lock-step)
* ``stormN``           N concurrent curl RRQs of the 1 MiB file: wall seconds
                       until the last ends, and how many got the exact size.
A transfer counts only if the received size is exact.
On the 2-vCPU bench VM lock-step figures are bimodal for every server: about
200 MB/s while server and client share a CPU, about 20 MB/s when each sleeps
on its own CPU (waking a halted vCPU costs ~20 us per block and side), and
the kernel picks the placement; read the [min-max] next to each median.  ``pvsfarm`` is one
process; ``pvsfarm-Nw`` is N processes sharing the port (SO_REUSEPORT), the
way a C server's forks/threads use every core.

usage: python benchmarks/tftp_bench.py [--rounds 3] [--repeat-small 10] [--storm 200] [--workers 2] [--dnsmasq] [--nice-clients]
Needs curl, atftp, in.tftpd (tftpd-hpa) and atftpd (PATH, or $ATFTPD; the
Debian package conflicts with tftpd-hpa: ``apt-get download atftpd`` and
``dpkg -x`` it, then point $ATFTPD at usr/sbin/atftpd).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BLKSIZE = 1468
CLIENT_PREFIX: list[str] = []
"""Prepended to every client command (``--nice-clients``: ``nice -n 19``)."""
FILES = {"f1m.bin": 1 << 20, "f32m.bin": 32 << 20}
SMALL_BYTES = 1 << 20
"""Files this small are fetched ``--repeat-small`` times per round: one 1 MiB transfer
lasts ~7 ms, so a single sample is mostly where the scheduler put client and server."""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_pvsfarm(root: str, port: int, reuse_port: bool) -> None:
    """``--serve`` mode: the pvsfarm server alone in this process, under uvloop."""
    import asyncio
    import logging

    import uvloop

    from pvsfarm.bootstrap.tftp.server import TftpSettings, start_tftp_server

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        settings = TftpSettings(root=Path(root), host="127.0.0.1", port=port, max_transfers=1000, reuse_port=reuse_port)
        await start_tftp_server(settings)
        await asyncio.Event().wait()

    uvloop.run(main())


def server_commands(root: Path, dnsmasq: bool, workers: int) -> dict[str, tuple[list[list[str]], int]]:
    """label -> (commands, port); several commands share the port (SO_REUSEPORT)."""
    cmds: dict[str, tuple[list[list[str]], int]] = {}
    p = free_udp_port()
    cmds["pvsfarm"] = ([[sys.executable, __file__, "--serve", str(root), str(p)]], p)
    if workers > 1:
        p = free_udp_port()
        serve = [sys.executable, __file__, "--serve", str(root), str(p), "--reuse-port"]
        cmds[f"pvsfarm-{workers}w"] = ([serve] * workers, p)
    p = free_udp_port()
    tftpd = ["in.tftpd", "-L", "--address", f"127.0.0.1:{p}", "--user", "root", "--secure", str(root)]
    cmds["tftpd-hpa"] = ([tftpd], p)
    atftpd = os.environ.get("ATFTPD") or shutil.which("atftpd") or "/opt/atftpd/root/usr/sbin/atftpd"
    if os.path.exists(atftpd):
        p = free_udp_port()
        cmds["atftpd"] = (
            [[atftpd, "--daemon", "--no-fork", "--port", str(p), "--bind-address", "127.0.0.1",
             "--maxthread", "400", "--logfile", "/dev/null", str(root)]],
            p,
        )
    else:
        print(f"# atftpd not found ({atftpd}); skipped", file=sys.stderr)
    if dnsmasq:
        cmds["dnsmasq"] = (
            [["dnsmasq", "-k", "-C", "/dev/null", "--port=0", "--enable-tftp", f"--tftp-root={root}",
             "--listen-address=127.0.0.1", "--bind-interfaces", "--tftp-max=400", "--user=root", "--quiet-tftp"]],
            69,
        )
    return cmds


def fetch(client: str, port: int, name: str, out: Path, window: int | None = None) -> float | None:
    """One transfer; seconds, or None if it failed or the size is wrong."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    if client == "curl":
        cmd = ["curl", "-s", "--tftp-blksize", str(BLKSIZE), "-o", str(out), "-w", "%{time_total}",
               f"tftp://127.0.0.1:{port}/{name}"]
    else:
        cmd = ["atftp", "--option", f"blksize {BLKSIZE}"]
        cmd += ["--option", f"windowsize {window}"] if window else []
        cmd += ["-g", "-r", name, "-l", str(out), "127.0.0.1", str(port)]
    res = subprocess.run(CLIENT_PREFIX + cmd, capture_output=True, text=True, timeout=120, check=False)
    wall = time.perf_counter() - start
    if res.returncode != 0 or not out.exists() or out.stat().st_size != FILES[name]:
        return None
    return float(res.stdout) if client == "curl" else wall


def storm(port: int, n: int) -> tuple[float, int]:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*CLIENT_PREFIX, "curl", "-s", "--tftp-blksize", str(BLKSIZE), "-o", "/dev/null", "-w", "%{size_download}",
             f"tftp://127.0.0.1:{port}/f1m.bin"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        for _ in range(n)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    elapsed = time.perf_counter() - start
    return elapsed, sum(o.strip() == str(FILES["f1m.bin"]) for o in outputs)


def measure(label: str, port: int, tmp: Path, storm_n: int, results: dict, repeat_small: int = 1) -> None:
    out = tmp / f"out-{label}"

    def record(test: str, unit: str, value: float) -> None:
        results[(test, unit)][label].append(value)
        print(f"RAW\ttftp\t{label}\t{test}\t{unit}\t{value:.3f}", flush=True)

    for name, size in FILES.items():
        for test, client, window in (("curl", "curl", None), ("atftp", "atftp", None), ("atftp-w8", "atftp", 8)):
            for _ in range(repeat_small if size <= SMALL_BYTES else 1):
                seconds = fetch(client, port, name, out, window)
                if seconds:
                    record(f"{test}:{name}", "MB/s", size / seconds / 1e6)
                else:
                    print(f"# {label} {test}:{name} FAILED", flush=True)
    if storm_n:
        seconds, ok = storm(port, storm_n)
        record(f"storm{storm_n}xf1m", "s", seconds)
        record(f"storm{storm_n}xf1m:ok", "count", ok)


def report(results: dict, labels: list[str]) -> None:
    """Markdown table: median [min-max] per server, then pvsfarm/peer ratios."""
    ours = [lb for lb in labels if lb.startswith("pvsfarm")]
    pairs = [(o, p) for o in ours for p in labels if p not in ours]
    head = "| test (unit) | " + " | ".join(labels) + " | " + " | ".join(f"{o} / {p}" for o, p in pairs) + " |"
    print("\n" + head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for (test, unit), by_label in results.items():
        med = {lb: statistics.median(v) for lb, v in by_label.items() if v}
        cells = [
            f"**{med[lb]:.3g}** [{min(by_label[lb]):.3g}-{max(by_label[lb]):.3g}]" if lb in med else "-"
            for lb in labels
        ]
        ratios = []
        for o, p in pairs:
            if unit == "count" or o not in med or p not in med or not med[o] or not med[p]:
                ratios.append("-")
            else:  # storm seconds: lower is better, so invert
                ratios.append(f"{(med[p] / med[o]) if unit == 's' else (med[o] / med[p]):.2f}")
        print(f"| {test} ({unit}) | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print("\nratio > 1: pvsfarm faster (MB/s: pvsfarm/peer; storm: peer seconds / pvsfarm seconds)")


def wait_udp_listening(port: int, sockets: int = 1, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-Hlun", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
        if len(out.strip().splitlines()) >= sockets:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on udp/{port}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--storm", type=int, default=200, help="concurrent 1 MiB transfers (0: skip)")
    ap.add_argument("--repeat-small", type=int, default=10,
                    help="fetches of the 1 MiB file per test and round (each is one sample)")
    ap.add_argument("--dnsmasq", action="store_true", help="also dnsmasq (binds 127.0.0.1:69)")
    ap.add_argument("--workers", type=int, default=2, help="also pvsfarm with N SO_REUSEPORT processes (<2: skip)")
    ap.add_argument("--nice-clients", action="store_true",
                    help="run clients at nice 19: on loopback they share the CPUs with the server; this "
                         "approximates remote clients and stops 200 local curls starving a 1-process server")
    ap.add_argument("--serve", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_pvsfarm(args.serve[0], int(args.serve[1]), args.reuse_port)
        return
    if args.nice_clients:
        CLIENT_PREFIX[:] = ["nice", "-n", "19"]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # page-cache resident, as in RESULTS.md
    with tempfile.TemporaryDirectory(prefix="pvsfarm-tftp-", dir=shm) as d:
        tmp = Path(d)
        tmp.chmod(0o755)  # atftpd drops to nobody
        root = tmp / "root"
        root.mkdir()
        for name, size in FILES.items():
            (root / name).write_bytes(os.urandom(size))
        cmds = server_commands(root, args.dnsmasq, args.workers)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for label, (argvs, port) in cmds.items():
                for argv in argvs:
                    procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    print(f"# {label}: udp/{port} pid {procs[-1].pid}: {' '.join(argv)}", flush=True)
                wait_udp_listening(port, len(argvs))
            results: dict = defaultdict(lambda: defaultdict(list))
            for rnd in range(args.rounds):
                for label, (_, port) in cmds.items():
                    print(f"# round {rnd + 1} {label}", flush=True)
                    measure(label, port, tmp, args.storm, results, args.repeat_small)
            report(results, list(cmds))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
