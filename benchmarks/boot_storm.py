#!/usr/bin/env python3
"""Boot storm: N simulated targets with distinct MACs power on at once against K
pvsfarm nodes, then the same workload against a reference stack (issue 6).

Each target: DHCP (DISCOVER/OFFER/REQUEST/ACK as iPXE) → TFTP of the bootstrap
named in the ACK → (pvsfarm only) login on the first server of the bootstrap
that answers ``/boot.json`` → NBD connect to the assigned server and a boot
working set of ``--reads`` x ``--read-kib`` (default 128 x 256 KiB = 32 MiB),
checked against the image's CRC-32 (zlib, ~4 GB/s here against SHA-256's ~1.7:
500 x 32 MiB is 16 GiB through one client process, and the checksum must not be
what is measured).

Topology (made here, deleted at exit even on error): namespaces
``pvsb-storm-<hex>-{sw,s1..sK,cli}``; ``sw`` holds bridge br0, ``sK`` are the
servers (10.78.0.K/16), ``cli`` holds every target (10.78.0.200/16). The
targets are asyncio tasks in ``--procs`` client processes (default 1), all
started at one instant, no concurrency bound. Their DHCP shares one port-68
socket per process (`pvsfarm.target.dhcp.DhcpPort`, replies routed by xid and
chaddr); reservations put target i at 10.78.(1 + i // 250).(1 + i % 250), but
the targets keep the client's one address (500 addresses on one interface test
nothing here).

Stacks, one after the other in the same namespaces:
* ``pvsfarm``: K real ``pvsfarm node`` processes (DHCP on, TFTP, login, NBD) on
  a throwaway PostgreSQL (over its Unix socket), a verified copy of the vDisk on
  each node, N devices with reservations, the bootstrap naming every node.
* ``reference``: per server ``dnsmasq`` (DHCP + TFTP, the same reservations,
  ``--leasefile-ro``, TFTP serving the same bootstrap bytes, ``--tftp-max`` above
  N: its default of 50 would only measure retransmits) and ``nbdkit -r file`` of
  the same image; no login: target i reads from server ``i % K``.

Reports time-to-all-booted (start instant → last target's last verified read),
p50/p99 per phase, who answered what, sessions per node (from the login answers
and from ``pvsfarm server list --json``) and errors, then the ratio. Targets
(issue 6): 500 targets on 2 nodes, zero errors, node loads within ±10 % of
their mean, time-to-all-booted ≤ 1.0x the reference.

    python benchmarks/boot_storm.py [--targets 500] [--nodes 2] [--reads 128] [--read-kib 256]
        [--procs 1] [--stacks pvsfarm,reference] [--budget-s 120]

Needs root, iproute2, dnsmasq (dnsmasq-base), nbdkit, PostgreSQL (tools/pg_ctl_as_postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUBNET, PREFIX = "10.78.0.0/16", 16
CLIENT_IP = "10.78.0.200"
HTTP_PORT, NBD_PORT = 8080, 10809
VDISK = "base"
DHCP_TIMEOUT_S, DHCP_TRIES = 1.0, 4
"""First DHCP wait and tries (1+2+3+4 = 10 s worst case), the same for both stacks."""
READ_TIMEOUT_S = 30.0
"""Per NBD read: a read this slow is a dead link to the target (failover in pvsfarm)."""
DHCP_RCVBUF_BYTES = 8 << 20
"""Room for K x N replies arriving in one burst at the shared client socket."""
SETTLE_S = 3.0
"""Nodes re-read the inventory every heartbeat (0.5 s in tests.netns)."""


def server_ip(k: int) -> str:
    return f"10.78.0.{k + 1}"


def mac_of(i: int) -> str:
    return f"52:54:00:4e:{i >> 8 & 255:02x}:{i & 255:02x}"


def reserved_ip(i: int) -> str:
    return f"10.78.{1 + i // 250}.{1 + i % 250}"


# --- the client (``--client SPEC``, inside the client namespace) -----------------------

async def storm_target(spec: dict[str, Any], i: int, port: Any) -> dict[str, Any]:
    from pvsfarm.addr import MacAddress
    from pvsfarm.target.boot import BootReport, Stream, TargetSettings
    from pvsfarm.target.dhcp import obtain_lease
    from pvsfarm.target.login import login, parse_bootstrap
    from pvsfarm.target.nbd import NbdClient
    from pvsfarm.target.tftp import tftp_get

    mac = MacAddress.parse(mac_of(i))
    out: dict[str, Any] = {"i": i, "ok": False, "phases": {}}
    step, mark = "dhcp", time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark, step
        now = time.monotonic()
        out["phases"][name] = now - mark
        mark = now

    try:
        lease = await obtain_lease(spec["iface"], mac, port=port, timeout_s=DHCP_TIMEOUT_S, tries=DHCP_TRIES)
        out["dhcp_server"], out["tftp_server"] = str(lease.server_id), str(lease.tftp_server)
        lap("dhcp")
        step = "tftp"
        urls = parse_bootstrap((await tftp_get(lease.tftp_server, lease.boot_file)).decode("utf-8", "replace"))
        lap("tftp")
        size = spec["reads"] * spec["read_bytes"]
        if spec["stack"] == "pvsfarm":
            step = "login"
            settings = TargetSettings(mac, spec["iface"], read_timeout_s=READ_TIMEOUT_S)
            answer, out["login_url"] = await login(urls, mac)
            out["server"] = answer.server
            lap("login")
            step = "nbd"
            stream = Stream(settings, urls, answer, BootReport(str(mac), spec["iface"]))
            read, close = stream.read, lambda: stream.client.close() if stream.client else asyncio.sleep(0)
        else:
            step = "nbd"
            k = i % len(spec["servers"])
            out["server"] = f"s{k + 1}"
            client = await NbdClient.connect(spec["servers"][k], NBD_PORT, "", timeout_s=READ_TIMEOUT_S)
            read = lambda off, n: client.read(off, n, timeout_s=READ_TIMEOUT_S)  # noqa: E731
            close = client.close
        crc = 0
        for offset in range(0, size, spec["read_bytes"]):
            crc = zlib.crc32(await read(offset, spec["read_bytes"]), crc)
        await close()
        lap("nbd")
        if crc != spec["crc32"]:
            raise ValueError(f"checksum mismatch: crc32 {crc:08x}, want {spec['crc32']:08x}")
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 - every failure is one target's error, reported by step
        out["error"] = f"{step}: {type(exc).__name__}: {exc}"
    out["done_at"] = time.time()
    return out


async def client_main(spec: dict[str, Any]) -> list[dict[str, Any]]:
    from pvsfarm.target.dhcp import DhcpPort

    port = await DhcpPort.open(spec["iface"], rcvbuf_bytes=DHCP_RCVBUF_BYTES)
    try:
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        work = asyncio.gather(*(storm_target(spec, i, port) for i in spec["targets"]))
        try:
            return list(await asyncio.wait_for(work, spec["budget_s"]))
        except TimeoutError:
            return [{"i": i, "ok": False, "phases": {}, "error": "budget: the storm outlasted --budget-s",
                     "done_at": time.time()} for i in spec["targets"]]
    finally:
        port.close()


def run_client(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        import uvloop
        results = uvloop.run(client_main(spec))
    except ImportError:
        results = asyncio.run(client_main(spec))
    print(json.dumps(results))


# --- the farm side ----------------------------------------------------------------

def raise_fd_limit() -> None:
    """500 targets hold a TFTP socket, an HTTP and an NBD connection each."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_proc(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from tests.netns import Segment

        self.args, self.tmp = args, tmp
        self.procs: list[Any] = []
        self.seg = Segment(prefix="pvsb-storm")
        try:
            self.servers = [self.seg.host(f"s{k + 1}", addr=f"{server_ip(k)}/{PREFIX}") for k in range(args.nodes)]
            self.client = self.seg.host("cli", addr=f"{CLIENT_IP}/{PREFIX}")
        except BaseException:
            self.seg.delete()
            raise
        self.image = tmp / "base.img"
        with self.image.open("wb") as f:
            f.write(os.urandom(args.reads * args.read_kib * 1024))
        data = self.image.read_bytes()
        self.crc32 = zlib.crc32(data)
        self.copies = [tmp / f"copy-s{k + 1}.img" for k in range(args.nodes)]
        for copy in self.copies:
            copy.write_bytes(data)

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop() if hasattr(proc, "stop") else stop_proc(proc)
            except Exception as exc:  # noqa: BLE001 - keep cleaning up the rest
                print(f"cleanup: {exc}", file=sys.stderr)
        self.procs.clear()

    def storm(self, stack: str, extra: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
        """Run the client processes; (start instant, per-target results)."""
        n, p = self.args.targets, max(1, self.args.procs)
        start_at = time.time() + 1.0 + 0.3 * p
        clients = []
        for j in range(p):
            spec = {"stack": stack, "iface": "eth0", "targets": list(range(j, n, p)), "reads": self.args.reads,
                    "read_bytes": self.args.read_kib * 1024, "crc32": self.crc32, "start_at": start_at,
                    "budget_s": self.args.budget_s, **extra}
            path = self.tmp / f"spec-{stack}-{j}.json"
            path.write_text(json.dumps(spec))
            out = (self.tmp / f"out-{stack}-{j}.json").open("wb")
            proc = subprocess.Popen(["ip", "netns", "exec", self.client, sys.executable, __file__, "--client",
                                     str(path)], stdout=out, stderr=subprocess.DEVNULL, cwd=ROOT)
            clients.append((proc, out, j))
        results: list[dict[str, Any]] = []
        for proc, out, j in clients:
            try:
                proc.wait(self.args.budget_s + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            out.close()
            text = (self.tmp / f"out-{stack}-{j}.json").read_text().strip()
            results += json.loads(text) if text else [
                {"i": i, "ok": False, "phases": {}, "error": f"client process exited {proc.returncode}",
                 "done_at": time.time()} for i in range(j, n, p)]
        return start_at, results

    # -- pvsfarm ------------------------------------------------------------------

    def run_pvsfarm(self) -> dict[str, Any]:
        from benchmarks.pg import ThrowawayPostgres
        from tests.netns import admin, start_ns_node, wait_log

        a = self.args
        with ThrowawayPostgres() as pg:
            tcp_url = pg.url
            sock_url = f"postgresql+psycopg2://postgres@/postgres?host=/tmp&port={pg.port}"
            admin(tcp_url, "db", "upgrade")
            nodes = []
            try:
                for k, ns in enumerate(self.servers):
                    node = start_ns_node(self.tmp, f"n{k + 1}", ns, server_ip(k), SUBNET, sock_url,
                                         http_port=HTTP_PORT, nbd_port=NBD_PORT)
                    nodes.append(node)
                    self.procs.append(node)
                for node in nodes:
                    wait_log(node, "node ready")
                admin(tcp_url, "vdisk", "add", VDISK, "--file", str(self.copies[0]), "--no-copy",
                      config=nodes[0].config)
                for k in range(1, len(nodes)):
                    admin(tcp_url, "vdisk", "copy", VDISK, "--server", nodes[k].name, "--path", str(self.copies[k]))
                csv = self.tmp / "devices.csv"
                csv.write_text("mac,name,ipv4,vdisk\n" + "".join(
                    f"{mac_of(i)},t{i:04d},{reserved_ip(i)},{VDISK}\n" for i in range(a.targets)))
                admin(tcp_url, "device", "import", "--csv", str(csv))
                admin(tcp_url, "bootstrap", "configure", *sum((["--server", n.name] for n in nodes), []))
                time.sleep(SETTLE_S)
                start, results = self.storm("pvsfarm", {})
                loads = self._loads(tcp_url, sum(1 for r in results if "server" in r))
            finally:
                for node in nodes:
                    node.stop()
                    self.procs.remove(node)
        return {"start": start, "results": results, "loads": loads}

    def _loads(self, tcp_url: str, expected: int) -> dict[str, int]:
        """`pvsfarm server list --json` once the nodes flushed every session (bounded wait)."""
        from tests.netns import admin

        loads: dict[str, int] = {}
        for _ in range(20):
            loads = {row["name"]: row["load"] for row in json.loads(admin(tcp_url, "server", "list", "--json"))}
            if sum(loads.values()) >= expected:
                break
            time.sleep(0.5)
        return loads

    # -- reference ----------------------------------------------------------------

    def run_reference(self) -> dict[str, Any]:
        from pvsfarm.bootstrap.ipxe import Endpoint, bootstrap_script

        a = self.args
        tftp_root = self.tmp / "ref-tftp"
        tftp_root.mkdir(exist_ok=True)
        endpoints = [Endpoint(f"n{k + 1}", f"http://{server_ip(k)}:{HTTP_PORT}") for k in range(a.nodes)]
        (tftp_root / "boot.ipxe").write_text(bootstrap_script(endpoints, 5000, 1))
        hosts = self.tmp / "dnsmasq-hosts.txt"
        hosts.write_text("".join(f"{mac_of(i)},{reserved_ip(i)}\n" for i in range(a.targets)))
        procs = []
        try:
            for k, ns in enumerate(self.servers):
                for cmd in (self._dnsmasq(k, hosts, tftp_root), self._nbdkit(k)):
                    log = (self.tmp / f"ref-{cmd[0]}-s{k + 1}.log").open("wb")
                    proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log, stderr=subprocess.STDOUT)
                    log.close()
                    procs.append(proc)
                    self.procs.append(proc)
            self._wait_listening()
            start, results = self.storm("reference", {"servers": [server_ip(k) for k in range(a.nodes)]})
        finally:
            for proc in procs:
                stop_proc(proc)
                self.procs.remove(proc)
        return {"start": start, "results": results, "loads": {}}

    def _dnsmasq(self, k: int, hosts: Path, tftp_root: Path) -> list[str]:
        return ["dnsmasq", "-k", "-C", "/dev/null", "--port=0", "--interface=eth0", "--bind-interfaces",
                f"--dhcp-range={SUBNET.split('/')[0]},static,255.255.0.0,1h", f"--dhcp-hostsfile={hosts}",
                "--no-ping", "--quiet-dhcp", "--leasefile-ro", "--user=root",
                f"--pid-file={self.tmp / f'dnsmasq-s{k + 1}.pid'}", "--enable-tftp", f"--tftp-root={tftp_root}",
                f"--tftp-max={max(1024, 2 * self.args.targets)}", "--dhcp-boot=boot.ipxe",
                f"--log-facility={self.tmp / f'dnsmasq-s{k + 1}.syslog'}"]

    def _nbdkit(self, k: int) -> list[str]:
        return ["nbdkit", "-f", "-r", "-i", server_ip(k), "-p", str(NBD_PORT), "file", str(self.copies[k])]

    def _wait_listening(self, timeout_s: float = 10.0) -> None:
        """Every nbdkit accepts (dnsmasq binds at start; a dead one shows in the errors)."""
        deadline = time.monotonic() + timeout_s
        for ns, k in zip(self.servers, range(len(self.servers))):
            while time.monotonic() < deadline:
                res = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{NBD_PORT}"],
                                     capture_output=True, text=True, timeout=10)
                if server_ip(k) in res.stdout:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"nbdkit on s{k + 1} is not listening")


# --- report -----------------------------------------------------------------------

def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(stack: str, run: dict[str, Any], n: int, names: dict[str, str]) -> float | None:
    """Print one stack's figures; its time-to-all-booted (None unless every target booted)."""
    results = run["results"]
    ok = [r for r in results if r["ok"]]
    errors = [r for r in results if not r["ok"]]
    last = max((r["done_at"] for r in ok), default=run["start"])
    total = last - run["start"] if len(ok) == n else None
    print(f"\n== {stack}: {len(ok)}/{n} targets booted, {len(errors)} errors")
    shown = f"{total:.2f} s" if total is not None else f"n/a (last success at {last - run['start']:.2f} s)"
    print(f"time-to-all-booted: {shown}")
    print("phase        p50 s    p99 s    max s")
    for phase in ("dhcp", "tftp", "login", "nbd"):
        vals = [r["phases"][phase] for r in ok if phase in r["phases"]]
        if vals:
            label = "nbd read" if phase == "nbd" else phase
            print(f"{label:10s} {quantile(vals, .5):7.3f}  {quantile(vals, .99):7.3f}  {max(vals):7.3f}")
    for what, key in (("DHCP answered by", "dhcp_server"), ("TFTP from", "tftp_server"),
                      ("login answered by", "login_url"), ("sessions (login answers)", "server")):
        counts = Counter(names.get(r[key], r[key]) for r in results if r.get(key))
        if counts:
            print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if run["loads"]:
        print("sessions (server list --json): " + ", ".join(f"{k} {v}" for k, v in sorted(run["loads"].items())))
        vals = list(run["loads"].values())
        mean = sum(vals) / len(vals)
        spread = max(abs(v - mean) for v in vals) / mean * 100 if mean else 0.0
        print(f"load balance: max deviation from the mean {spread:.1f} % (target <= 10 %: "
              f"{'meets' if spread <= 10 else 'MISSES'})")
    for error, count in Counter(r["error"] for r in errors).most_common(5):
        print(f"  error x{count}: {error}")
    return total


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--client", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--targets", type=int, default=500)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--reads", type=int, default=128, help="NBD reads per target")
    ap.add_argument("--read-kib", type=int, default=256, help="bytes per read, KiB")
    ap.add_argument("--procs", type=int, default=2, help="client processes (targets split between them)")
    ap.add_argument("--stacks", default="pvsfarm,reference")
    ap.add_argument("--budget-s", type=float, default=120.0, help="bound on one storm")
    return ap.parse_args()


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    if args.client:
        run_client(args.client)
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes network namespaces")
    missing = [t for t in ("ip", "ss", "dnsmasq", "nbdkit") if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (apt-get install iproute2 dnsmasq-base nbdkit)")
    if not 1 <= args.nodes <= 9 or not 1 <= args.targets <= 62_000:
        sys.exit("--nodes must be 1..9 and --targets 1..62000")
    stacks = [s for s in args.stacks.split(",") if s]
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _raise_exit)
    names = {"pvsfarm": {**{server_ip(k): f"n{k + 1}" for k in range(args.nodes)},
                         **{f"http://{server_ip(k)}:{HTTP_PORT}": f"n{k + 1}" for k in range(args.nodes)}},
             "reference": {server_ip(k): f"s{k + 1}" for k in range(args.nodes)}}
    print(f"boot storm: {args.targets} targets, {args.nodes} servers, {args.reads} x {args.read_kib} KiB NBD reads "
          f"each ({args.targets * args.reads * args.read_kib / 1024 ** 2:.1f} GiB in all), {args.procs} client "
          f"process(es), no concurrency bound", flush=True)
    totals: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="pvsb-storm-") as tmp:
        os.chmod(tmp, 0o755)
        bench = None
        try:
            bench = Bench(args, Path(tmp))
            for stack in stacks:
                run = bench.run_pvsfarm() if stack == "pvsfarm" else bench.run_reference()
                totals[stack] = summarize(stack, run, args.targets, names[stack])
        finally:
            if bench is not None:
                bench.cleanup()
                bench.seg.delete()
    p, r = totals.get("pvsfarm"), totals.get("reference")
    if p and r:
        print(f"\npvsfarm/reference time-to-all-booted: {p / r:.2f}x (target <= 1.0x: "
              f"{'meets' if p / r <= 1.0 else 'MISSES'})")


if __name__ == "__main__":
    main()
