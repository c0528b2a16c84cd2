"""DHCPv4 DORA/s: pvsfarm (uvloop) vs dnsmasq vs Kea, measured with perfdhcp in one run.

Topology (made here, deleted at exit even on error): per server a namespace
pair ``pvsb-dhcp-<tag>-srv`` / ``-cli`` joined by veth ``vs``/``vc`` (created
from inside the server namespace: the host's own namespace never sees them),
subnet 10.123.0.0/16, server 10.123.0.1, client 10.123.0.2. Nothing touches a
real interface. All servers start at once, each alone in its namespace, and
idle while another is measured.

Reservations: 1,000 MAC -> IPv4, MAC ``02:50:00:00:hi:lo`` for i = 0..999
(hi, lo = i >> 8, i & 0xff) -> 10.123.(1 + i // 250).(1 + i % 250). perfdhcp
``-b mac=02:50:00:00:00:00 -R 1000`` draws r = random() % 1000 per exchange and
adds it to the base MAC octet by octet from the right (Kea 2.2
``TestControl::generateMacAddress``), so with a zero tail it sends exactly
these 1,000 MACs. pvsfarm counts MACs missing from its inventory; the report
prints that count, which must be 0.

Servers:
* ``pvsfarm``  `start_dhcp_server` + `MemoryInventory`, uvloop, its own process
  (this script with ``--serve``).
* ``dnsmasq``  ``--leasefile-ro`` (a lease file rewritten per packet caps it
  near 500/s, shared/bench/RESULTS.md), ``dhcp-host`` reservations from
  ``--dhcp-hostsfile``, static range.
* ``kea``      kea-dhcp4, raw socket, single-threaded, memfile ``persist=false``,
  ``hw-address`` host reservations.

Method: a rate ladder (``perfdhcp -r R -p PERIOD``, 4-way DORA, broadcast on
``vc``), interleaved: at each rate every server still climbing takes its step,
so all see the same minute of this shared host. A step passes when drops
< 1 % of sent (DISCOVER-OFFER + REQUEST-ACK). A rate passes if one of up to
``--attempts`` (3) steps passes: other work on a shared host only ever lowers
a step, so this estimates the server's undisturbed capacity. Two failed
rates in a row (``--patience``) end that server's ladder, then one bisection
step between its highest pass and the next failed rate refines the answer. The figure is the achieved
DORA/s at the highest passing rate. Each step also shows the server's CPU time
per DORA (user + system, incl. the veth transmit it does) and the datagrams
its UDP receive buffer dropped. With ``--pin`` (default) servers run on CPU 0
and perfdhcp on CPU 1: each single-threaded server gets the same one core, and
perfdhcp needs most of the other at >= 8k/s.

usage: python benchmarks/dhcp_bench.py [--period 3] [--rates 1000,2000,...] [--attempts 3]
           [--servers pvsfarm,dnsmasq,kea] [--rounds 1] [--no-pin]
           [--baseline OTHER_CHECKOUT] [--py-spy OUT.svg]
Needs root, iproute2, taskset, perfdhcp (Debian package kea-admin), kea-dhcp4
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
DEFAULT_RATES = "1000,2000,3000,4000,5000,6000,7000,8000,9000,10000"
STOP_GRACE_S = 5.0
LABELS = ("pvsfarm", "pvsfarm-base", "dnsmasq", "kea")


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
    devices = {}
    for i, (mac, ip) in enumerate(json.loads(Path(conf_dir, "hosts.json").read_text())):
        m = MacAddress.parse(mac)
        devices[m] = DeviceView(m, f"t{i:04d}", IPv4Address(ip), "bench", "vdisk", True)
    inventory = MemoryInventory(Snapshot(devices=devices))
    settings = DhcpSettings(interface=SRV_IF, server_ip=IPv4Address(SERVER_IP),
                            subnet=IPv4Network(SUBNET), routers=(IPv4Address(SERVER_IP),))
    unknown = [0]

    def on_unknown(mac: object, msg: object) -> None:
        unknown[0] += 1

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        handle = await start_dhcp_server(settings, inventory, on_unknown=on_unknown)
        await stop.wait()
        handle.close()
        s = handle.stats
        print(json.dumps({"received": s.received, "replied": s.replied, "malformed": s.malformed,
                          "errors": s.errors, "unknown": unknown[0]}), flush=True)

    uvloop.run(serve())


# --- namespaces -------------------------------------------------------------------

def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def wait_up(ns: str, ifname: str, timeout_s: float = 5.0) -> None:
    """operstate UP: linkwatch attaches the real qdisc up to ~1 s after
    ``link set up``, and frames sent before are dropped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                             check=True, capture_output=True, text=True, timeout=10).stdout
        if json.loads(out)[0].get("operstate") == "UP":
            return
        time.sleep(0.05)
    raise TimeoutError(f"{ns}/{ifname} did not come up")


class Segment:
    """A server and a client namespace joined by one veth pair."""

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
    seg: Segment
    proc: subprocess.Popen[bytes]
    log: Path
    profiler: subprocess.Popen[bytes] | None = None

    def profile(self, out: str) -> None:
        """py-spy samples the server from outside (it writes ``out`` on SIGINT)."""
        self.profiler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.proc.pid), "--native", "-r", "200",
             "-o", out, *(["-f", "raw"] if out.endswith(".txt") else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_server(label: str, conf: Path, cpu: str | None, baseline: str | None) -> Server:
    """Make the server's namespace pair and start it there. Returns once the
    process runs; `wait_ready` checks that it answers."""
    seg = Segment()
    try:
        seg.create()
        src = baseline if label == "pvsfarm-base" and baseline else Path(__file__).resolve().parents[1]
        env = dict(os.environ, KEA_PIDFILE_DIR=str(conf), KEA_LOCKFILE_DIR=str(conf),
                   PYTHONPATH=str(src))
        cmd = server_command(label, conf)
        if cpu is not None:
            cmd = ["taskset", "-c", cpu, *cmd]
        log = conf / f"{label}.log"
        with open(log, "wb") as out:
            # `ip netns exec` and `taskset` exec, so the PID is the server's own.
            proc = subprocess.Popen(["ip", "netns", "exec", seg.srv, *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
    except BaseException:
        seg.delete()
        raise
    return Server(label, seg, proc, log)


def stop_server(server: Server) -> None:
    """Stop the profiler and the server by PID (TERM, then KILL), drop the namespaces."""
    for proc, sig in ((server.profiler, signal.SIGINT), (server.proc, signal.SIGTERM)):
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(sig)
        try:
            proc.wait(20 if proc is server.profiler else STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_GRACE_S)
    server.seg.delete()


def pvsfarm_counters(server: Server) -> dict[str, int] | None:
    lines = server.log.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None


# --- measuring --------------------------------------------------------------------

@dataclass
class Step:
    rate: int
    achieved: float
    drop_pct: float
    sent: int
    period_s: float = 0.0
    cpu_s: float = 0.0
    """Server CPU time (user + system) during the step."""
    sys_s: float = 0.0
    """The system part of ``cpu_s``."""
    rcvbuf_drops: int = 0
    """UDP RcvbufErrors in the server's namespace during the step."""

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.drop_pct < DROP_LIMIT_PCT

    @property
    def cpu_us_per_dora(self) -> float:
        done = self.achieved * self.period_s
        return 1e6 * self.cpu_s / done if done else 0.0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds (proc(5) fields 14, 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def udp_rcvbuf_errors(ns: str) -> int:
    """Datagrams the namespace's UDP sockets dropped for a full receive
    buffer (Kea reads through a packet socket: not counted here)."""
    snmp = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, timeout=10).stdout
    rows = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1])).get("RcvbufErrors", 0)) if len(rows) == 2 else 0


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


def wait_ready(server: Server, cpu: str | None, timeout_s: float = 15.0) -> None:
    """The server answers a short low-rate run (which also warms it up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.proc.poll() is None:
        step = perfdhcp(server.seg, 100, 1, 1000, cpu)
        if step.achieved > 0 and step.drop_pct < 50:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.label} did not answer; log:\n{server.log.read_text()[-2000:]}")


def run_step(server: Server, rate: int, args: argparse.Namespace, cpu: str | None) -> Step:
    user0, sys0 = cpu_seconds(server.proc.pid)
    errors0 = udp_rcvbuf_errors(server.seg.srv)
    step = perfdhcp(server.seg, rate, args.period, args.clients, cpu)
    user1, sys1 = cpu_seconds(server.proc.pid)
    step.rcvbuf_drops = udp_rcvbuf_errors(server.seg.srv) - errors0
    step.period_s, step.cpu_s, step.sys_s = args.period, user1 - user0 + sys1 - sys0, sys1 - sys0
    print(f"  {server.label:12s} r={rate:>6}: {step.achieved:8.1f} DORA/s  drops {step.drop_pct:6.2f} %"
          f"  CPU {step.cpu_us_per_dora:5.1f} us/DORA"
          f" ({100 * step.sys_s / step.cpu_s if step.cpu_s else 0:3.0f} % sys)"
          f"  rcvbuf drops {step.rcvbuf_drops:<5d} {'ok' if step.ok else 'FAIL'}", flush=True)
    return step


@dataclass
class Result:
    """One server's ladder in one round."""

    steps: list[Step] = field(default_factory=list)
    failed_in_a_row: int = 0
    """Consecutive failed rates; the ladder ends at ``--patience``."""

    def best(self) -> Step | None:
        ok = [s for s in self.steps if s.ok]
        return max(ok, key=lambda s: s.rate) if ok else None

    def first_fail(self) -> Step | None:
        best = self.best()
        bad = [s for s in self.steps if not s.ok and (best is None or s.rate > best.rate)]
        return min(bad, key=lambda s: s.rate) if bad else None


def interleaved_ladder(servers: list[Server], rates: list[int], args: argparse.Namespace,
                       cpu: str | None, deadline: float) -> dict[str, Result]:
    """Rate by rate, every server still climbing takes its step."""
    results = {s.label: Result() for s in servers}

    def attempt(server: Server, rate: int) -> bool:
        for _ in range(args.attempts):
            if server.proc.poll() is not None or time.monotonic() > deadline:
                return False
            step = run_step(server, rate, args, cpu)
            results[server.label].steps.append(step)
            if step.ok:
                return True
        return False

    for rate in rates:
        climbing = [s for s in servers if results[s.label].failed_in_a_row < args.patience]
        if not climbing:
            break
        if time.monotonic() > deadline:
            print(f"  time budget spent: ladder stopped before r={rate}")
            break
        for server in climbing:
            r = results[server.label]
            r.failed_in_a_row = 0 if attempt(server, rate) else r.failed_in_a_row + 1
    for server in servers:  # one bisection step between last pass and first fail
        best, fail = results[server.label].best(), results[server.label].first_fail()
        if best and fail and fail.rate - best.rate > 250:
            attempt(server, (best.rate + fail.rate) // 2 // 100 * 100)
    return results


# --- report -----------------------------------------------------------------------

def median_best(runs: list[Result]) -> Step | None:
    """The median over rounds of each round's best step (the lower middle
    one for an even count; a round without a passing step ranks lowest)."""
    bests = sorted((r.best() for r in runs), key=lambda s: s.achieved if s else -1.0)
    return bests[(len(bests) - 1) // 2] if bests else None


def report(results: dict[str, list[Result]], args: argparse.Namespace,
           counters: dict[str, dict[str, int]]) -> None:
    print(f"\nDHCPv4 DORA/s at < {DROP_LIMIT_PCT:g} % drops: perfdhcp -r R -p {args.period:g}, "
          f"{args.clients:,} reserved MACs, {args.rounds} interleaved round(s)\n")
    print("| server | highest passing rate | achieved DORA/s | drops % | server CPU us/DORA "
          "| first failing rate (drops %) | best per round |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        b = median_best(runs)
        fail = next((f for r in runs if (f := r.first_fail()) is not None), None)
        fail_s = f"{fail.rate:,} ({fail.drop_pct:.1f})" if fail else "none: top of ladder"
        rounds = ", ".join(f"{s.achieved:,.0f}" if (s := r.best()) else "-" for r in runs)
        if b is None:
            print(f"| {label} | none | - | - | - | {fail_s} | {rounds} |")
        else:
            print(f"| {label} | {b.rate:,} | {b.achieved:,.0f} | {b.drop_pct:.2f} "
                  f"| {b.cpu_us_per_dora:.0f} | {fail_s} | {rounds} |")
    print()
    for label, c in counters.items():
        warn = "" if c.get("unknown") == 0 else "  <- perfdhcp sent MACs without reservations!"
        print(f"{label} counters: {json.dumps(c)}{warn}")
    p = median_best(results.get("pvsfarm", []))
    for other, target in (("dnsmasq", 1.0), ("kea", 0.7), ("pvsfarm-base", 1.0)):
        o = median_best(results.get(other, []))
        if p and o and o.achieved:
            ratio = p.achieved / o.achieved
            print(f"pvsfarm/{other}: {ratio:.2f}x (target >= {target:.1f}x: "
                  f"{'meets' if ratio >= target else 'BELOW'})")


# --- main -------------------------------------------------------------------------

def check_tools(labels: list[str]) -> None:
    unknown = set(labels) - set(LABELS)
    if unknown:
        sys.exit(f"unknown servers: {', '.join(sorted(unknown))} (known: {', '.join(LABELS)})")
    need = {"ip", "perfdhcp", "taskset"} | ({"dnsmasq"} & set(labels)) \
        | ({"kea-dhcp4"} if "kea" in labels else set())
    missing = sorted(t for t in need if shutil.which(t) is None)
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (apt-get install kea-admin "
                 "kea-dhcp4-server dnsmasq-base iproute2 util-linux)")
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes network namespaces")


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--serve", metavar="CONF_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--servers", default="pvsfarm,dnsmasq,kea")
    ap.add_argument("--rates", default=DEFAULT_RATES, help="offered DORA/s ladder")
    ap.add_argument("--period", type=float, default=3.0, help="seconds per step (perfdhcp -p)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved ladders to run")
    ap.add_argument("--attempts", type=int, default=3, help="tries per rate before it fails")
    ap.add_argument("--patience", type=int, default=2, help="failed rates in a row that end a ladder")
    ap.add_argument("--clients", type=int, default=1000, help="reservations = perfdhcp -R")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds before ladders stop")
    ap.add_argument("--no-pin", action="store_true", help="do not pin servers/perfdhcp to CPUs 0/1")
    ap.add_argument("--baseline", metavar="SRC_DIR", help="also measure the pvsfarm package in "
                    "this checkout (label pvsfarm-base), e.g. a `git worktree` of HEAD")
    ap.add_argument("--py-spy", metavar="OUT", help="profile the pvsfarm server with py-spy "
                    "(.svg flame graph, .txt raw stacks)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
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
    results: dict[str, list[Result]] = {label: [] for label in labels}
    counters: dict[str, dict[str, int]] = {}
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="pvsb-dhcp-") as tmp:
        conf = Path(tmp)
        os.chmod(conf, 0o755)
        write_configs(conf, reservations(args.clients))
        try:
            for label in labels:
                servers.append(start_server(label, conf, srv_cpu, args.baseline))
            for server in servers:
                wait_ready(server, cli_cpu)
                if args.py_spy and server.label == "pvsfarm":
                    server.profile(args.py_spy)
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}", flush=True)
                for label, result in interleaved_ladder(servers, rates, args, cli_cpu,
                                                        deadline).items():
                    results[label].append(result)
        finally:
            for server in servers:
                stop_server(server)
                if server.label.startswith("pvsfarm") and (c := pvsfarm_counters(server)):
                    counters[server.label] = c
    report(results, args, counters)


if __name__ == "__main__":
    main()
