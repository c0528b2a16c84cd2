"""``pvsfarm demo``: a two-node farm boots targets, loses a node, keeps going.

With ``qemu-system-x86_64`` (and what the boot artifacts are built from) installed, one QEMU
VM PXE-boots Linux from the farm and its serving node is killed (`pvsfarm.lab.demo_vm`);
otherwise, or with ``--simulated``, three simulated targets boot as described below.

Everything lives in network namespaces ``pvsdemo-<hex>-{sw,n1,n2,t1..t3}`` and a
temporary directory, both removed at the end (nodes and targets stopped by PID
first), whatever happens. The two nodes are real ``pvsfarm node`` processes
sharing one embedded SQLite file (a farm is nodes sharing a database; on one
machine a shared file is enough), each serving DHCP on its own port of the demo
bridge only. Each target (``pvsfarm target`` in its own namespace, with its own
MAC) does DHCP → TFTP → login → NBD reads; once all stream, the node serving
the most targets is killed with SIGKILL and its targets fail over.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from pvsfarm.errors import PvsfarmError
from pvsfarm.lab.netns import Segment

PREFIX = "pvsdemo"
SUBNET = "10.79.0.0/24"
NODES = {"n1": "10.79.0.1", "n2": "10.79.0.2"}
TARGETS = {f"t{i}": (f"52:54:00:79:00:{20 + i:02x}", f"10.79.0.{20 + i}") for i in (1, 2, 3)}
IMAGE_BYTES = 4 << 20
READ_KIB, READ_DELAY_MS = 64, 40
"""64 reads of 64 KiB, 40 ms apart: ~2.6 s of streaming per target, time to kill a node mid-read."""
DEADLINE_S = 55.0
"""The whole demo, bounded (issue 6: under 60 s)."""


class DemoError(PvsfarmError):
    """The demo could not run (not root, a tool missing, a step failed)."""


@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    t0_wall: float = field(default_factory=time.time)
    say: Callable[[str], None] = print
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def at(self, t: float, who: str, what: str) -> None:
        self.events.append((t - self.t0, who, what))

    def now(self, who: str, what: str) -> None:
        """Record, and show as progress (the timeline is printed in order at the end)."""
        self.at(time.monotonic(), who, what)
        self.say(f"  ... {who}: {what}")


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class DemoTarget:
    name: str
    mac: str
    proc: subprocess.Popen[str]
    started: float
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def connected_to(self) -> str | None:
        for line in list(self.lines):
            if "nbd: connected to " in line:
                return line.split("nbd: connected to ", 1)[1].split()[0]
        return None


class Demo:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.tl = Timeline(say=say)
        self.deadline = time.monotonic() + DEADLINE_S
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
        os.chmod(self.tmp, 0o755)
        self.db_url = f"sqlite:///{self.tmp / 'farm.sqlite'}"
        self.seg: Segment | None = None
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.targets: list[DemoTarget] = []
        self.procs: list[subprocess.Popen[Any]] = []
        """Helpers (the VM path's QEMU and RA sender): killed by PID first in `cleanup`."""

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def cleanup(self) -> None:
        for proc in self.procs:
            _stop(proc, signal.SIGKILL)
        for t in self.targets:
            _stop(t.proc)
        for proc in self.nodes.values():
            _stop(proc)
        if self.seg is not None:
            self.seg.delete()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the farm ------------------------------------------------------------------

    def node_config(self, name: str) -> Path:
        addr = NODES[name]
        cfg = {"name": name, "address": addr, "data_dir": str(self.tmp / name), "database_url": self.db_url,
               "heartbeat_interval_s": 0.5, "dead_after_s": 3.0,
               "http": {"listen_address": addr, "listen_port": 8080},
               "nbd": {"listen_address": addr, "listen_port": 10809},
               "tftp": {"listen_address": addr, "listen_port": 69},
               "dhcp": {"interface": "eth0", "server_ip": addr, "subnet": SUBNET}}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start_farm(self, *, targets: bool = True) -> None:
        from pvsfarm.app import App
        from pvsfarm.config import NodeConfig

        App(NodeConfig(), self.db_url).upgrade()  # before the nodes: they would race to create it
        self.seg = Segment(PREFIX, wait_each=False)
        node_ns = {n: self.seg.host(n, addr=f"{a}/24") for n, a in NODES.items()}
        self.target_ns = {t: self.seg.host(t, mac=mac) for t, (mac, _ip4) in TARGETS.items()} if targets else {}
        self.seg.wait_up_all()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_")}
        for name, ns in node_ns.items():
            log = (self.tmp / f"{name}.log").open("wb")
            self.nodes[name] = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "pvsfarm", "--config", str(self.node_config(name)),
                 "node"], stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
        for name in NODES:
            self._wait_log(name, "node ready")
            self.tl.now(name, f"node up at {NODES[name]}: DHCP on the demo bridge, TFTP, login API, NBD")

    def _wait_log(self, name: str, needle: str) -> None:
        log = self.tmp / f"{name}.log"
        while needle not in log.read_text(errors="replace"):
            if self.nodes[name].poll() is not None or self.left_s() < 0:
                raise DemoError(f"node {name} did not start:\n{log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)

    def register(self, image: Path | None = None, targets: dict[str, tuple[str, str]] = TARGETS,
                 timeout_ms: int = 1000) -> str:
        """A vDisk (``image``, or generated data) with a verified copy on each node, the targets, the bootstrap."""
        from pvsfarm.admin import devices, farm, vdisks
        from pvsfarm.app import App
        from pvsfarm.config import NodeConfig
        from pvsfarm.db.engine import session_scope
        from pvsfarm.views import BootMethod, CacheType, VDiskMode

        if image is None:
            image = self.tmp / "demo.img"
            seed = hashlib.sha256(b"pvsfarm demo").digest()
            image.write_bytes(b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
                                       for i in range(IMAGE_BYTES // 32)))
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        app = App(dataclasses.replace(NodeConfig(), name="n1"), self.db_url, actor="pvsfarm-demo")
        try:
            with session_scope(app.sessions()) as s:
                n1 = farm.ensure_server(s, "n1", NODES["n1"], http_port=8080, nbd_port=10809, tftp_port=69)
                vdisks.add_vdisk(s, app.actor, n1, "demo", image, self.tmp / "n1" / "store", mode=VDiskMode.STANDARD,
                                 cache_type=CacheType.SERVER, boot_method=BootMethod.SANBOOT)
            copy = self.tmp / "n2" / "store" / "demo.img"  # node 2 holds its own copy, as on local disks
            shutil.copyfile(image, copy)
            with session_scope(app.sessions()) as s:
                vdisks.add_copy(s, app.actor, "demo", "n2", copy)
                for name, (mac, ip4) in targets.items():
                    devices.add_device(s, app.actor, devices.make_spec(mac, name, ip4, None, "demo"))
                farm.configure_bootstrap(s, app.actor, list(NODES), timeout_ms, None)
        finally:
            app.close()
        self.tl.now("farm", f"vDisk demo ({image.stat().st_size >> 20} MiB, sha256 {digest[:12]}…) verified on n1 "
                            f"and n2; {', '.join(f'{t} ({mac})' for t, (mac, _a) in targets.items())} registered; "
                            "bootstrap lists n1, n2")
        time.sleep(1.2)  # both nodes re-read the inventory every heartbeat (0.5 s)
        return digest

    # -- the targets -----------------------------------------------------------------

    def boot_targets(self, digest: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_")}
        for name, (mac, _ip4) in TARGETS.items():
            cmd = ["ip", "netns", "exec", self.target_ns[name], sys.executable, "-m", "pvsfarm", "target", "--mac", mac,
                   "--iface", "eth0", "--json", "--verify-sha256", digest, "--read-kib", str(READ_KIB),
                   "--read-delay-ms", str(READ_DELAY_MS), "--dhcp-timeout-s", "0.5", "--read-timeout-s", "2"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            t = DemoTarget(name, mac, proc, time.monotonic())
            t.reader = threading.Thread(target=self._read_stderr, args=(t,), daemon=True)
            t.reader.start()
            self.targets.append(t)
        self.tl.now("farm", f"powered on {len(self.targets)} simulated targets (pvsfarm target, one namespace each)")

    @staticmethod
    def _read_stderr(t: DemoTarget) -> None:
        assert t.proc.stderr is not None
        for line in iter(t.proc.stderr.readline, ""):  # ends at EOF
            t.lines.append(line)

    def kill_busier(self) -> tuple[str, float, Counter[str]]:
        """Once every target streams, SIGKILL the node serving the most (ties: by name)."""
        while any(t.connected_to() is None for t in self.targets):
            failed = [t for t in self.targets if t.proc.poll() is not None]
            if failed or self.left_s() < 20:
                who = failed[0] if failed else next(t for t in self.targets if t.connected_to() is None)
                raise DemoError(f"target {who.name} never streamed:\n{''.join(who.lines)[-1500:]}")
            time.sleep(0.02)
        time.sleep(0.5)  # a few reads in: the kill lands mid-stream
        load = Counter(t.connected_to() for t in self.targets)
        victim = sorted(load.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        self.nodes[victim].send_signal(signal.SIGKILL)
        self.nodes[victim].wait(10)
        killed_at = time.monotonic()
        self.tl.at(killed_at, "farm", f"kill -9 {victim} (the busier node: {load[victim]} of {len(self.targets)} "
                                      f"targets stream from it; loads {dict(sorted(load.items()))})")
        return victim, killed_at, load  # type: ignore[return-value]

    def collect(self) -> list[dict[str, Any]]:
        reports = []
        for t in self.targets:
            try:
                t.proc.wait(max(1.0, self.left_s()))  # stderr belongs to the reader thread
            except subprocess.TimeoutExpired as exc:
                raise DemoError(f"target {t.name} did not finish in time") from exc
            assert t.proc.stdout is not None
            out = t.proc.stdout.read()  # the JSON report: a few KiB, fits the pipe
            if t.reader is not None:
                t.reader.join(5)
            report = json.loads(out) if out.strip() else {}
            if t.proc.returncode != 0:
                raise DemoError(f"target {t.name} failed: {report.get('error') or ''.join(t.lines)[-1500:]}")
            reports.append(report)
        return reports

    def boot_events(self, t: DemoTarget, r: dict[str, Any], names: dict[str, str]) -> None:
        """The target's steps on the timeline, at the times its log lines carry (steps without
        a line of their own: the previous step's time plus the step's duration)."""
        logged = _logged_times(t.lines, self.tl)
        at, steps = t.started, r["timings_s"]
        first_url = logged.get("login_url", r["login_url"])  # the report's is the last login's (after failover)
        login_node = names.get(first_url or "", first_url)
        dhcp_node = names.get(r["dhcp_server"], r["dhcp_server"])
        tftp_node = names.get(r["tftp_server"], r["tftp_server"])
        for step, text in (
                ("dhcp", f"DHCP   lease {r['address']} from {dhcp_node}"),
                ("tftp", f"TFTP   {r['boot_file']} from {tftp_node} (bootstrap lists {len(r['bootstrap_servers'])}"
                         " servers)"),
                ("login", f"login  answered by {login_node}: vDisk {r['vdisk']} assigned to {r['first_server']}"),
                ("nbd_connect", f"NBD    vDisk served by {r['first_server']}: connected, reading")):
            at = logged.get(step, at + steps.get(step, 0.0))
            self.tl.at(at, t.name, f"{text} ({steps.get(step, 0.0) * 1000:.0f} ms)")
        failovers = logged.get("failover", [])
        for i, f in enumerate(r["failovers"]):
            at = failovers[i] if i < len(failovers) else at
            self.tl.at(at, t.name, f"FAILOVER {f['from_server']} -> {f['to_server']} in {f['seconds']:.2f} s "
                                   f"({f['attempts']} attempt(s), read at offset {f['offset']} retried, "
                                   f"session {'resumed' if f['resumed'] else 'new'})")
        self.tl.at(logged.get("done", t.started + steps.get("total", 0.0)), t.name,
                   f"booted: {r['bytes_read'] >> 20} MiB read, sha256 {'verified' if r['verified'] else 'MISMATCH'}, "
                   f"last served by {r['server']}")


LOGGED_STEPS = (("dhcp: ", "dhcp"), ("login: ", "login"), ("nbd: connected to ", "nbd_connect"))


def _logged_times(lines: list[str], tl: Timeline) -> dict[str, Any]:
    """Step → monotonic time, from the target's log lines (``asctime`` is local wall time, ms)."""
    found: dict[str, Any] = {"failover": []}
    for line in lines:
        try:
            wall = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        at = tl.t0 + (wall - tl.t0_wall)
        message = line.split("pvsfarm.target: ", 1)[-1]
        if message.startswith("login: ") and " assigned by " in message and "login_url" not in found:
            found["login_url"] = message.split(" assigned by ", 1)[1].split()[0]
        if message.startswith("failover: ") and " -> " in message:
            found["failover"].append(at)
        if message.startswith("nbd: read ") and " bytes from " in message:
            found["done"] = at
        for prefix, step in LOGGED_STEPS:
            if message.startswith(prefix) and step not in found:
                found[step] = at
    return found


def _names() -> dict[str, str]:
    return {**{a: n for n, a in NODES.items()}, **{f"http://{a}:8080": n for n, a in NODES.items()}}


@contextmanager
def _terminating() -> Iterator[None]:
    """SIGTERM/SIGINT unwind through the cleanup like an error."""
    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM,)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise DemoError("pvsfarm demo needs root: it creates network namespaces (run it with sudo)")
    if shutil.which("ip") is None:
        raise DemoError("pvsfarm demo needs iproute2's `ip` (apt-get install iproute2)")


def run_demo(say: Callable[[str], None] = print, *, simulated: bool = False) -> dict[str, Any]:
    """Run the whole demo; returns a summary (also printed through ``say``). A QEMU VM boots when
    qemu-system-x86_64 and the boot artifacts are available (and not ``simulated``)."""
    check_prerequisites()
    art = None
    if not simulated:
        from pvsfarm.lab import demo_vm

        art = demo_vm.artifacts_or_why(say)
        if isinstance(art, str):
            say(f"  (no QEMU VM: {art}; booting simulated targets instead)")
            art = None
    demo = Demo(say)
    if art is not None:
        say("pvsfarm demo: two nodes sharing one farm database (embedded SQLite), one QEMU VM")
    else:
        say("pvsfarm demo: two nodes sharing one farm database (embedded SQLite), three simulated targets")
    say(f"  namespaces {PREFIX}-*, files in {demo.tmp}; all removed at the end\n")
    try:
        with _terminating():
            if art is not None:
                return demo_vm.run_vm(demo, art)
            demo.start_farm()
            digest = demo.register()
            demo.boot_targets(digest)
            victim, killed_at, load = demo.kill_busier()
            reports = demo.collect()
            return _finish(demo, reports, victim, killed_at, load)
    finally:
        demo.cleanup()


def _finish(demo: Demo, reports: list[dict[str, Any]], victim: str, killed_at: float,
            load: Counter[str]) -> dict[str, Any]:
    names, tl = _names(), demo.tl
    for t, r in zip(demo.targets, reports):
        demo.boot_events(t, r, names)
    failovers = [{"target": t.name, **f} for t, r in zip(demo.targets, reports) for f in r["failovers"]]
    tl.events.sort()
    demo.say("\ntimeline (sorted):")
    for at, who, what in tl.events:
        demo.say(f"  t+{at:6.2f} s  {who:4s}  {what}")
    moved = [f for f in failovers if f["from_server"] == victim]
    worst = max((f["seconds"] for f in moved), default=0.0)
    demo.say(f"\nsummary: {len(reports)} targets booted and verified; {victim} killed while serving {load[victim]}; "
             f"{len(moved)} target(s) failed over to {', '.join(sorted({f['to_server'] for f in moved})) or '-'} "
             f"(slowest {worst:.2f} s); total {time.monotonic() - tl.t0:.1f} s")
    return {"killed": victim, "failovers": failovers, "reports": reports}



@click.command("demo")
@click.option("--simulated", is_flag=True, help="Boot simulated targets even when QEMU is installed.")
def demo(simulated: bool) -> None:
    """Watch a two-node farm boot targets and survive losing a node (root; cleans up).

    With qemu-system-x86_64 installed, a QEMU VM PXE-boots Linux from the farm (< 90 s);
    otherwise (or with --simulated) three simulated targets boot (< 60 s)."""
    run_demo(click.echo, simulated=simulated)
