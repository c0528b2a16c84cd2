"""DHCPv4 DORA/s: pvsfarm (uvloop) vs dnsmasq vs Kea, measured with perfdhcp in one run.

Topology (made here, deleted at exit even on error): namespaces
``pvsb-dhcp-<tag>-srv`` and ``-cli`` joined by veth ``vs``/``vc`` (created from
inside the server namespace: the host's own namespace never sees them), subnet
10.123.0.0/16, server 10.123.0.1, client 10.123.0.2. Every server runs alone
in the server namespace, one after the other; nothing touches a real interface.

Reservations: 1,000 MAC -> IPv4, MAC ``02:50:00:00:hi:lo`` for i = 0..999
(hi, lo = i >> 8, i & 0xff) -> 10.123.(1 + i // 250).(1 + i % 250). perfdhcp
``-b mac=02:50:00:00:00:00 -R 1000`` draws r = random() % 1000 per exchange and
adds it to the base MAC octet by octet from the right (Kea 2.2
``TestControl::generateMacAddress``), so with a zero tail it sends exactly
these 1,000 MACs. pvsfarm counts MACs missing from its inventory: the table
shows that count, which must be 0.

Servers:
* ``pvsfarm``  `start_dhcp_server` + `MemoryInventory`, uvloop, its own process
  (this script with ``--serve``).
* ``dnsmasq``  ``--leasefile-ro`` (no lease file: the shared/bench anchor shows a
  lease file rewrite per packet caps it near 500/s), ``dhcp-host`` reservations
  from ``--dhcp-hostsfile``, static range.
* ``kea``      kea-dhcp4, raw socket, single-threaded, memfile ``persist=false``,
  ``hw-address`` host reservations.

Method: for each server a rate ladder (``perfdhcp -r R -p PERIOD``, 4-way DORA,
broadcast on ``vc``); a step passes when drops < 1 % of sent (DISCOVER-OFFER +
REQUEST-ACK). The ladder stops after a step fails twice; one bisection step
between the last pass and the first fail refines the answer. The figure is the
achieved DORA/s at the highest passing rate. With ``--pin`` (default) the
server runs on CPU 0 and perfdhcp on CPU 1, so each single-threaded server gets
the same one core; perfdhcp needs most of a core at >= 8k/s.

usage: python benchmarks/dhcp_bench.py [--period 5] [--rates 1000,2000,...]
           [--servers pvsfarm,dnsmasq,kea] [--rounds 1] [--no-pin] [--py-spy OUT]
Needs root, iproute2, perfdhcp (Debian package kea-admin), kea-dhcp4
(kea-dhcp4-server), dnsmasq (dnsmasq-base) and uvloop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.123.0.0/16"
SERVER_IP = "10.123.0.1"
CLIENT_IP = "10.123.0.2"
BASE_MAC = "02:50:00:00:00:00"
SRV_IF, CLI_IF = "vs", "vc"
DROP_LIMIT_PCT = 1.0
DEFAULT_RATES = "1000,2000,3000,4000,5000,6000,7000,8000,9000,10000,12000"
STOP_GRACE_S = 5.0


def reservations(n: int) -> list[tuple[str, str]]:
    """(MAC, IPv4) pairs matching perfdhcp ``-b mac=BASE_MAC -R n`` (n <= 62,500)."""
    return [(f"02:50:00:00:{i >> 8:02x}:{i & 0xff:02x}", f"10.123.{1 + i // 250}.{1 + i % 250}")
            for i in range(n)]


# --- pvsfarm server process (``--serve``) ----------------------------------------

def serve_pvsfarm(conf_dir: str) -> None:
    """Run pvsfarm's DHCP server alone in this process under uvloop until
    SIGTERM, then print its counters as one JSON line."""
    import asyncio
    import logging
    from ipaddress import IPv4Address, IPv4Network

    import uvloop

    from pvsfarm.addr import MacAddress
    from pvsfarm.bootstrap.dhcp.server import start_dhcp_server
    from pvsfarm.bootstrap.dhcp.session import DhcpSettings
    from pvsfarm.db.snapshot import MemoryInventory, Snapshot
    from pvsfarm.views import DeviceView

    logging.basicConfig(level=logging.WARNING)
    hosts = json.loads(Path(conf_dir, "hosts.json").read_text())
    devices = {}
    for i, (mac, ip) in enumerate(hosts):
        m = MacAddress.parse(mac)
        devices[m] = DeviceView(m, f"t{i:04d}", IPv4Address(ip), "bench", "vdisk", True)
    inventory = MemoryInventory(Snapshot(devices=devices))
    settings = DhcpSettings(interface=SRV_IF, server_ip=IPv4Address(SERVER_IP),
                            subnet=IPv4Network(SUBNET), routers=(IPv4Address(SERVER_IP),))
    unknown = [0]

    def on_unknown(mac: object, msg: object) -> None:
        unknown[0] += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        handle = await start_dhcp_server(settings, inventory, on_unknown=on_unknown)
        print("ready", flush=True)
        await stop.wait()
        handle.close()
        s = handle.stats
        print(json.dumps({"received": s.received, "replied": s.replied, "malformed": s.malformed,
                          "errors": s.errors, "unknown": unknown[0]}), flush=True)

    uvloop.run(main())


# --- namespaces -------------------------------------------------------------------

def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def wait_up(ns: str, ifname: str, timeout_s: float = 5.0) -> None:
    """operstate UP: the real qdisc is attached by linkwatch up to ~1 s after
    ``link set up``, frames sent before are dropped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                             check=True, capture_output=True, text=True, timeout=10).stdout
        if json.loads(out)[0].get("operstate") == "UP":
            return
        time.sleep(0.05)
    raise TimeoutError(f"{ns}/{ifname} did not come up")


class Segment:
    """Server and client namespaces joined by one veth pair."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.srv, self.cli = f"pvsb-dhcp-{tag}-srv", f"pvsb-dhcp-{tag}-cli"
        self.namespaces: list[str] = []

    def create(self) -> None:
        for ns in (self.srv, self.cli):
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.srv, "link", "add", SRV_IF, "type", "veth", "peer", "name", CLI_IF,
           "netns", self.cli)
        ip("-n", self.srv, "addr", "add", f"{SERVER_IP}/16", "dev", SRV_IF)
        ip("-n", self.cli, "addr", "add", f"{CLIENT_IP}/16", "dev", CLI_IF)
        ip("-n", self.srv, "link", "set", SRV_IF, "up")
        ip("-n", self.cli, "link", "set", CLI_IF, "up")
        wait_up(self.srv, SRV_IF)
        wait_up(self.cli, CLI_IF)

    def delete(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()


# --- servers under test -----------------------------------------------------------

def write_configs(conf: Path, hosts: list[tuple[str, str]]) -> None:
    (conf / "hosts.json").write_text(json.dumps(hosts))
    (conf / "dnsmasq-hosts.txt").write_text("".join(f"{m},{a}\n" for m, a in hosts))
    kea = {"Dhcp4": {
        "interfaces-config": {"interfaces": [SRV_IF], "dhcp-socket-type": "raw"},
        "lease-database": {"type": "memfile", "persist": False, "lfc-interval": 0},
        "valid-lifetime": 3600, "renew-timer": 1800, "rebind-timer": 3000,
        "host-reservation-identifiers": ["hw-address"],
        "multi-threading": {"enable-multi-threading": False},
        "subnet4": [{"id": 1, "subnet": SUBNET,
                     "option-data": [{"name": "routers", "data": SERVER_IP}],
                     "pools": [{"pool": "10.123.200.1 - 10.123.250.254"}],
                     "reservations": [{"hw-address": m, "ip-address": a} for m, a in hosts]}],
        "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": "stdout"}],
                     "severity": "WARN"}]}}
    (conf / "kea-dhcp4.json").write_text(json.dumps(kea, indent=1))


def server_command(label: str, conf: Path) -> list[str]:
    if label.startswith("pvsfarm"):
        return [sys.executable, os.path.abspath(__file__), "--serve", str(conf)]
    if label == "dnsmasq":
        return ["dnsmasq", "-k", "-C", "/dev/null", "--port=0", f"--interface={SRV_IF}",
                "--bind-interfaces", "--dhcp-range=10.123.0.0,static,255.255.0.0,1h",
                f"--dhcp-hostsfile={conf / 'dnsmasq-hosts.txt'}", "--dhcp-authoritative",
                "--no-ping", "--quiet-dhcp", "--leasefile-ro", "--user=root",
                f"--pid-file={conf / 'dnsmasq.pid'}"]
    if label == "kea":
        return ["kea-dhcp4", "-c", str(conf / "kea-dhcp4.json")]
    raise ValueError(label)


@dataclass
class Server:
    label: str
    proc: subprocess.Popen[bytes]
    log: Path
    profiler: subprocess.Popen[bytes] | None = None

    def profile(self, out: str) -> None:
        """py-spy samples the server from outside (it writes ``out`` on SIGINT)."""
        self.profiler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.proc.pid), "--native", "-r", "200",
             "-o", out, *(["-f", "raw"] if out.endswith(".txt") else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_server(label: str, seg: Segment, conf: Path, cpu: str | None,
                 baseline: str | None = None) -> Server:
    src = baseline if label == "pvsfarm-base" and baseline else Path(__file__).resolve().parents[1]
    env = dict(os.environ, KEA_PIDFILE_DIR=str(conf), KEA_LOCKFILE_DIR=str(conf),
               KEA_LOGGER_DESTINATION="stdout", PYTHONPATH=str(src))
    cmd = server_command(label, conf)
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    log = conf / f"{label}.log"
    with open(log, "wb") as out:
        # `ip netns exec` and `taskset` exec, so the PID is the server's own.
        proc = subprocess.Popen(["ip", "netns", "exec", seg.srv, *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(label, proc, log)


def stop_server(server: Server) -> None:
    if server.profiler is not None and server.profiler.poll() is None:
        server.profiler.send_signal(signal.SIGINT)
        try:
            server.profiler.wait(20)
        except subprocess.TimeoutExpired:
            server.profiler.kill()
            server.profiler.wait(STOP_GRACE_S)
    if server.proc.poll() is None:
        try:
            server.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            server.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(STOP_GRACE_S)


# --- perfdhcp ---------------------------------------------------------------------

@dataclass
class Step:
    rate: int
    achieved: float
    drop_pct: float
    sent: int
    period_s: float = 0.0
    cpu_s: float = 0.0
    """Server CPU time (user + system, incl. the veth transmit it does) in the step."""

    @property
    def cpu_us_per_dora(self) -> float:
        done = self.achieved * self.period_s
        return 1e6 * self.cpu_s / done if done else 0.0

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.drop_pct < DROP_LIMIT_PCT


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (proc(5) fields 14, 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def perfdhcp(seg: Segment, rate: int, period_s: float, clients: int, cpu: str | None) -> Step:
    cmd = ["perfdhcp", "-4", "-l", CLI_IF, "-b", f"mac={BASE_MAC}", "-R", str(clients),
           "-r", str(rate), "-p", f"{period_s:g}"]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    try:
        out = subprocess.run(["ip", "netns", "exec", seg.cli, *cmd], capture_output=True,
                             text=True, timeout=period_s + 30).stdout
    except subprocess.TimeoutExpired:
        return Step(rate, 0.0, 100.0, 0)
    m = re.search(r"^Rate: ([0-9.]+)", out, re.M)
    sent = drops = 0
    in_stats = False
    for line in out.splitlines():
        if line.startswith("***Statistics for:"):
            in_stats = True
        elif in_stats and line.startswith("sent packets:"):
            sent += int(line.split()[2])
        elif in_stats and line.startswith("drops:"):
            drops += int(line.split()[1])
    return Step(rate, float(m.group(1)) if m else 0.0, 100.0 * drops / sent if sent else 100.0, sent)


def wait_ready(server: Server, seg: Segment, cpu: str | None, timeout_s: float = 15.0) -> None:
    """The server answers a short low-rate run (also warms it up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        step = perfdhcp(seg, 100, 1, 1000, cpu)
        if step.achieved > 0 and step.drop_pct < 50:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.label} did not answer; log:\n{server.log.read_text()[-2000:]}")


@dataclass
class Result:
    steps: list[Step] = field(default_factory=list)
    stats: dict[str, int] | None = None

    def best(self) -> Step | None:
        ok = [s for s in self.steps if s.ok]
        return max(ok, key=lambda s: s.rate) if ok else None

    def first_fail(self) -> Step | None:
        best = self.best()
        bad = [s for s in self.steps if not s.ok and (best is None or s.rate > best.rate)]
        return min(bad, key=lambda s: s.rate) if bad else None


def ladder(label: str, server: Server, seg: Segment, rates: list[int], period_s: float, clients: int,
           cpu: str | None, deadline: float, result: Result) -> None:
    def run(rate: int) -> Step:
        cpu0 = cpu_seconds(server.proc.pid)
        step = perfdhcp(seg, rate, period_s, clients, cpu)
        step.period_s, step.cpu_s = period_s, cpu_seconds(server.proc.pid) - cpu0
        result.steps.append(step)
        print(f"  {label:8s} r={rate:>6}: {step.achieved:9.1f} DORA/s  drops {step.drop_pct:6.2f} %"
              f"  server CPU {step.cpu_us_per_dora:5.1f} us/DORA  {'ok' if step.ok else 'FAIL'}", flush=True)
        return step

    last_ok, first_bad = 0, 0
    for rate in rates:
        if time.monotonic() > deadline:
            print(f"  {label}: time budget spent, ladder stopped at r={rate}")
            return
        if run(rate).ok or run(rate).ok:  # a failed step gets one retry (shared host)
            last_ok = rate
        else:
            first_bad = rate
            break
    if last_ok and first_bad and first_bad - last_ok > 250 and time.monotonic() < deadline:
        run((last_ok + first_bad) // 2 // 100 * 100)


# --- report -----------------------------------------------------------------------

def report(results: dict[str, list[Result]], period_s: float) -> None:
    def best_of(label: str) -> Step | None:
        bests = [b for r in results.get(label, []) if (b := r.best()) is not None]
        return sorted(bests, key=lambda s: s.achieved)[len(bests) // 2] if bests else None

    print(f"\nDORA/s at < {DROP_LIMIT_PCT:g} % drops (perfdhcp -r R -p {period_s:g}, "
          f"1,000 reservations; median over rounds)\n")
    print("| server | max rate < 1 % drops (offered) | achieved DORA/s | drops % "
          "| first failing rate (drops %) | pvsfarm unknown MACs |")
    print("|---|---|---|---|---|---|")
    for label, runs in results.items():
        b = best_of(label)
        fails = [f for r in runs if (f := r.first_fail()) is not None]
        fail = f"{fails[0].rate} ({fails[0].drop_pct:.1f})" if fails else "-"
        unknown = "-"
        if label.startswith("pvsfarm"):
            unknown = ", ".join(str(r.stats.get("unknown")) if r.stats else "?" for r in runs)
        if b is None:
            print(f"| {label} | none | - | - | {fail} | {unknown} |")
        else:
            print(f"| {label} | {b.rate:,} | {b.achieved:,.0f} | {b.drop_pct:.2f} | {fail} | {unknown} |")
    p = best_of("pvsfarm")
    for other, target in (("dnsmasq", 1.0), ("kea", 0.7)):
        o = best_of(other)
        if p and o and o.achieved:
            ratio = p.achieved / o.achieved
            verdict = "meets" if ratio >= target else "BELOW"
            print(f"pvsfarm/{other}: {ratio:.2f}x (target >= {target:.1f}x: {verdict})")


# --- main -------------------------------------------------------------------------

def check_tools(labels: list[str]) -> None:
    unknown = set(labels) - {"pvsfarm", "pvsfarm-base", "dnsmasq", "kea"}
    if unknown:
        sys.exit(f"unknown servers: {', '.join(sorted(unknown))}")
    need = {"ip", "perfdhcp", "taskset"} | {"dnsmasq" for l in labels if l == "dnsmasq"} \
        | {"kea-dhcp4" for l in labels if l == "kea"}
    missing = sorted(t for t in need if shutil.which(t) is None)
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (apt-get install kea-admin "
                 "kea-dhcp4-server dnsmasq-base iproute2 util-linux)")
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes network namespaces")


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--serve", metavar="CONF_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--servers", default="pvsfarm,dnsmasq,kea")
    ap.add_argument("--rates", default=DEFAULT_RATES, help="offered DORA/s ladder")
    ap.add_argument("--period", type=float, default=5.0, help="seconds per step (perfdhcp -p)")
    ap.add_argument("--rounds", type=int, default=1, help="ladders per server, round-robin")
    ap.add_argument("--clients", type=int, default=1000, help="reservations = perfdhcp -R")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds before ladders stop")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server/perfdhcp to CPUs 0/1")
    ap.add_argument("--baseline", metavar="SRC_DIR", help="also measure the pvsfarm in this "
                    "checkout (label pvsfarm-base), e.g. a `git worktree` of the last commit")
    ap.add_argument("--py-spy", metavar="OUT.svg", help="profile the pvsfarm server with py-spy (.svg flame graph, .txt raw)")
    args = ap.parse_args()
    if args.serve:
        serve_pvsfarm(args.serve)
        return
    labels = [s for s in args.servers.split(",") if s]
    if args.baseline and "pvsfarm-base" not in labels:
        labels.insert(labels.index("pvsfarm") + 1 if "pvsfarm" in labels else 0, "pvsfarm-base")
    rates = sorted(int(r) for r in args.rates.split(","))
    check_tools(labels)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    srv_cpu, cli_cpu = ("0", "1") if pin else (None, None)
    signal.signal(signal.SIGTERM, _raise_exit)
    deadline = time.monotonic() + args.budget
    seg = Segment()
    results: dict[str, list[Result]] = {label: [] for label in labels}
    server: Server | None = None
    with tempfile.TemporaryDirectory(prefix="pvsb-dhcp-") as tmp:
        conf = Path(tmp)
        os.chmod(conf, 0o755)
        write_configs(conf, reservations(args.clients))
        try:
            seg.create()
            for rnd in range(args.rounds):
                for label in labels:
                    print(f"round {rnd + 1}: {label}", flush=True)
                    server = start_server(label, seg, conf, srv_cpu, args.baseline)
                    result = Result()
                    results[label].append(result)
                    wait_ready(server, seg, cli_cpu)
                    if args.py_spy and label == "pvsfarm":
                        server.profile(args.py_spy)
                    ladder(label, server, seg, rates, args.period, args.clients, cli_cpu, deadline, result)
                    stop_server(server)
                    if label.startswith("pvsfarm"):
                        lines = server.log.read_text().strip().splitlines()
                        if lines and lines[-1].startswith("{"):
                            result.stats = json.loads(lines[-1])
                            print(f"  pvsfarm counters: {lines[-1]}")
                    server = None
        finally:
            if server is not None:
                stop_server(server)
            seg.delete()
    report(results, args.period)


if __name__ == "__main__":
    main()
