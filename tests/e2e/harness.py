"""The e2e farm: two real ``pvsfarm node`` processes in their own namespaces on
one bridged segment, a throwaway PostgreSQL cluster the tests may stop, an
IPv6 router advertiser, and QEMU targets on taps in the bridge's namespace.

Topology: namespace ``sw`` holds bridge br0 (no address), the taps of the VMs
and the RA sender (``pvsfarm/lab/ra.py``); ``s1``/``s2`` hold the nodes (10.77.0.1/.2, DHCP
on their eth0). QEMU runs inside ``sw`` (a tap is looked up by name in the
caller's namespace). The nodes reach PostgreSQL over its Unix socket in /tmp
(the filesystem is shared across namespaces, loopback TCP is not).

Everything is stopped by PID (VMs, nodes, RA sender) and the namespaces are
deleted in `E2EFarm.close`; every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from benchmarks.pg import ThrowawayPostgres
from pvsfarm.lab import RA_SCRIPT
from tests.e2e.artifacts import BootArtifacts
from tests.netns import NsNode, Segment, admin, clean_env, ip, start_ns_node, wait_log

SUBNET = "10.77.0.0/24"
SERVERS = {"n1": "10.77.0.1", "n2": "10.77.0.2"}
HTTP_PORT, NBD_PORT = 8080, 10809
LOGIN_URLS = tuple(f"http://{a}:{HTTP_PORT}" for a in SERVERS.values())
DEAD_AFTER_S = 3.0
HEARTBEAT_S = 0.5
BOOTSTRAP_TIMEOUT_MS = 3000
"""``chain --timeout`` per server in the bootstrap (lab Q3: a dead address costs this)."""
QEMU_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")
"""virtio-net-pci's default option ROM, from Debian's ipxe-qemu: iPXE itself, so DHCP sees
option 77. QEMU finds it on its firmware path; naming it with ``romfile=`` (absolute path)
leaves SeaBIOS without a network boot entry (QEMU 7.2, measured)."""
MILESTONES = (
    ("ipxe", r"^iPXE initialising devices"),
    ("dhcp", r"^Configuring \(net0 [^\n]*ok"),
    ("tftp", r"^boot\.ipxe : \d+ bytes"),
    ("login", r"^pvsfarm: \S+ from n\d"),
    ("sanboot", r"^Booting from SAN device"),
    ("syslinux", r"^SYSLINUX \d"),
    ("agent", r"pvsfarm-agent: started"),
    ("os_dhcp", r"pvsfarm-agent: dhcp "),
    ("nbd", r"pvsfarm-agent: attached "),
    ("marker", r"pvsfarm-agent: MARKER "),
)
"""Serial landmarks of a boot, timed from QEMU start by `VM`'s watcher (for the report)."""
NO_BOOT = r"No bootable device|Kernel panic|pvsfarm-agent: FATAL"
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_c])")
"""CSI sequences (iPXE colours) and two-byte escapes (the ESC c reset before Linux)."""


class VM:
    """One ``qemu-system-x86_64 -accel tcg`` PXE-booting from the iPXE NIC ROM."""

    def __init__(self, farm: E2EFarm, name: str, mac: str) -> None:
        self.farm, self.name, self.mac = farm, name, mac
        self.tap = f"tap-{name}"[:15]
        self.serial = farm.tmp / f"{name}.serial"
        self.qemu_log = farm.tmp / f"{name}.qemu.log"
        sw = farm.seg.sw
        ip("-n", sw, "tuntap", "add", "dev", self.tap, "mode", "tap")
        ip("-n", sw, "link", "set", self.tap, "master", "br0", "up")
        argv = ["ip", "netns", "exec", sw, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
                # -nographic (not -display none): only then SeaBIOS mirrors the console and
                # iPXE's text to the serial port (lab Q2 point 1).
                "-nographic", "-monitor", "none", "-nodefaults", "-no-user-config", "-no-reboot",
                "-serial", f"file:{self.serial}",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}", "-boot", "n"]
        self.seen: dict[str, float] = {}
        with self.qemu_log.open("wb") as out:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Time each milestone's first appearance (0.1 s resolution) until QEMU is gone."""
        pending = [(name, re.compile(rx, re.M)) for name, rx in MILESTONES]
        while pending:
            text = self.text()
            now = time.monotonic() - self.started
            for name, rx in list(pending):
                if rx.search(text):
                    self.seen[name] = now
                    pending.remove((name, rx))
            if self.proc.poll() is not None:
                return
            time.sleep(0.1)

    def timeline(self) -> str:
        return " ".join(f"{name}={t:.1f}" for name, t in sorted(self.seen.items(), key=lambda kv: kv[1]))

    def text(self) -> str:
        """The serial log without ANSI codes and carriage returns (lab Q2 point 6)."""
        try:
            raw = self.serial.read_bytes()
        except FileNotFoundError:
            return ""
        return _ANSI.sub("", raw.decode("latin-1")).replace("\r", "")

    def wait_for(self, pattern: str, timeout_s: float, *, after: int = 0,
                 fail_on: str = NO_BOOT) -> re.Match[str]:
        """The first match of ``pattern`` (multiline) at or after offset ``after``; fails with the log
        tail at the deadline or as soon as ``fail_on`` shows up (no point waiting any longer)."""
        regex, failed = re.compile(pattern, re.M), re.compile(fail_on, re.M)
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            match = regex.search(text, after)
            if match:
                return match
            if failed.search(text, after):
                raise AssertionError(f"{self.name}: {fail_on!r} before {pattern!r}\n{self.tail()}")
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name}: QEMU exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     f"{self.qemu_log.read_text(errors='replace')[-1000:]}\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout_s:.0f} s\n{self.tail()}")
            time.sleep(0.1)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def tail(self, chars: int = 3000) -> str:
        return f"--- serial tail of {self.name} ---\n{self.text()[-chars:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            subprocess.run(["ip", "-n", self.farm.seg.sw, "link", "del", self.tap], capture_output=True, timeout=10)


@dataclass
class E2EFarm:
    tmp: Path
    art: BootArtifacts
    pg: ThrowawayPostgres = field(default_factory=ThrowawayPostgres)
    seg: Segment | None = None
    nodes: dict[str, NsNode] = field(default_factory=dict)
    server_ns: dict[str, str] = field(default_factory=dict)
    ra: subprocess.Popen[bytes] | None = None
    vms: list[VM] = field(default_factory=list)
    pg_running: bool = False

    # -- set-up / tear-down ------------------------------------------------

    @property
    def admin_url(self) -> str:
        return self.pg.url

    @property
    def node_url(self) -> str:
        return f"postgresql+psycopg2://postgres@/postgres?host=/tmp&port={self.pg.port}"

    def start(self, devices: dict[str, str]) -> None:
        """PostgreSQL, the segment, the RA sender, both nodes; the vDisk on both; ``devices`` (MAC → IP)."""
        self.pg.__enter__()
        self.pg_running = True
        admin(self.admin_url, "db", "upgrade")
        self.seg = Segment(prefix="pvst-e2e")
        self.server_ns = {n: self.seg.host(f"s{n[1:]}", addr=f"{a}/24") for n, a in SERVERS.items()}
        with (self.tmp / "ra.log").open("wb") as out:
            self.ra = subprocess.Popen(["ip", "netns", "exec", self.seg.sw, sys.executable, str(RA_SCRIPT),
                                        "br0"], stdout=out, stderr=subprocess.STDOUT, env=clean_env())
        for name in SERVERS:
            self.start_node(name)
        for name in SERVERS:
            wait_log(self.nodes[name], "node ready", timeout_s=30)
        n1_copy, n2_copy = self.tmp / "n1-base.img", self.tmp / "n2" / "store" / "base.img"
        n2_copy.parent.mkdir(parents=True, exist_ok=True)
        for copy in (n1_copy, n2_copy):  # each node its own file, as on local stores
            shutil.copyfile(self.art.disk, copy)
        admin(self.admin_url, "vdisk", "add", "base", "--file", str(n1_copy), "--no-copy",
              config=self.nodes["n1"].config)
        admin(self.admin_url, "vdisk", "copy", "base", "--server", "n2", "--path", str(n2_copy))
        for i, (mac, addr) in enumerate(devices.items()):
            admin(self.admin_url, "device", "add", "--mac", mac, "--name", f"vm{i + 1}", "--ip", addr,
                  "--vdisk", "base")
        admin(self.admin_url, "bootstrap", "configure", *(a for n in SERVERS for a in ("--server", n)),
              "--timeout-ms", str(BOOTSTRAP_TIMEOUT_MS))
        self.wait_ready()

    def start_node(self, name: str) -> NsNode:
        old = self.tmp / f"{name}.log"
        if old.exists():  # keep every incarnation's log for diagnosis
            old.rename(self.tmp / f"{name}.{int(time.time() * 1000)}.log")
        node = start_ns_node(self.tmp, name, self.server_ns[name], SERVERS[name], SUBNET, self.node_url,
                             http_port=HTTP_PORT, nbd_port=NBD_PORT, heartbeat_interval_s=HEARTBEAT_S,
                             dead_after_s=DEAD_AFTER_S)
        self.nodes[name] = node
        return node

    def close(self) -> None:
        for vm in self.vms:
            vm.stop()
        for node in self.nodes.values():
            node.stop()
        if self.ra is not None and self.ra.poll() is None:
            self.ra.send_signal(signal.SIGKILL)
            self.ra.wait(timeout=10)
        if self.seg is not None:
            self.seg.delete()
        self.pg.__exit__(None, None, None)

    # -- farm state --------------------------------------------------------

    def health(self, name: str, *, attempts: int = 1) -> dict | None:  # type: ignore[type-arg]
        """The node's ``/health`` answer, asked from inside its namespace; None when it does not answer."""
        url = f"http://{SERVERS[name]}:{HTTP_PORT}/health"
        for _ in range(attempts):
            res = subprocess.run(["ip", "netns", "exec", self.server_ns[name], "curl", "-sf", "--noproxy", "*",
                                  "-m", "3", url], capture_output=True, text=True, timeout=10)
            if res.returncode == 0 and res.stdout:
                return json.loads(res.stdout)
            time.sleep(0.3)
        return None

    def dhcp_stats(self, name: str) -> dict:  # type: ignore[type-arg]
        h = self.health(name, attempts=5)
        assert h is not None and "dhcp" in h, f"{name} /health: {h}"
        return h["dhcp"]

    def servers(self) -> dict[str, dict]:  # type: ignore[type-arg]
        rows = json.loads(admin(self.admin_url, "server", "list", "--json"))
        return {row["name"]: row for row in rows}

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Both nodes running, healthy (DHCP answering) and heartbeating: each one's heartbeat seen
        to advance in the database (a node whose sync is broken keeps the one it wrote at start),
        then two more heartbeats so each inventory holds the other's."""
        deadline = time.monotonic() + timeout_s
        first_beat: dict[str, str] = {}
        while True:
            problems = [f"{n} exited" for n, node in self.nodes.items() if node.proc.poll() is not None]
            for name in SERVERS:
                h = self.health(name)
                if h is None or h.get("status") != "ok" or not h.get("dhcp", {}).get("answering"):
                    problems.append(f"{name} health {h}")
            if self.pg_running:
                rows = self.servers()
                for n in SERVERS:
                    row = rows.get(n) or {}
                    first_beat.setdefault(n, row.get("heartbeat_at") or "")
                    age = row.get("heartbeat_age_s")
                    if row.get("state") != "up" or age is None or age > 1.5 or row["heartbeat_at"] == first_beat[n]:
                        problems.append(f"{n} row {row}")
            if not problems:
                time.sleep(2 * HEARTBEAT_S + 0.2)
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"farm not ready: {problems}")
            time.sleep(0.3)

    def kill(self, name: str) -> float:
        """SIGKILL a node (no goodbye to the database); the time it happened."""
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=10)
        return time.monotonic()

    def wait_seen_dead(self, name: str, timeout_s: float = 15) -> None:
        """Until the survivors' inventories (refreshed every heartbeat) hold ``name`` as dead."""
        deadline = time.monotonic() + timeout_s
        while True:
            age = self.servers()[name]["heartbeat_age_s"]
            if age is not None and age > DEAD_AFTER_S + 2 * HEARTBEAT_S:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name} still alive in the database (heartbeat age {age})")
            time.sleep(0.2)

    def stop_database(self) -> None:
        self.pg.stop("immediate")
        self.pg_running = False

    def start_database(self) -> None:
        self.pg.start_again()
        self.pg_running = True

    def heal(self) -> None:
        """Back to the starting state after a test broke something: database up, both nodes up."""
        for vm in self.vms:
            vm.stop()
        self.vms.clear()
        if not self.pg_running:
            self.start_database()
        for name, node in self.nodes.items():
            if node.proc.poll() is not None:
                self.start_node(name)
                wait_log(self.nodes[name], "node ready", timeout_s=30)
        self.wait_ready()

    def sessions(self, mac: str) -> list[dict]:  # type: ignore[type-arg]
        """The device's stream sessions as the database has them (flushed every heartbeat)."""
        dsn = f"host=127.0.0.1 port={self.pg.port} user=postgres dbname=postgres"
        query = ("SELECT s.name AS server, ss.bytes_read, ss.ended_at IS NULL AS open FROM stream_sessions ss "
                 "JOIN servers s ON s.id = ss.server_id JOIN devices d ON d.id = ss.device_id "
                 "WHERE d.mac = %s ORDER BY ss.id")
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(query, (mac,)).fetchall()
        return [{"server": r[0], "bytes_read": r[1], "open": r[2]} for r in rows]

    # -- targets -----------------------------------------------------------

    def boot(self, name: str, mac: str) -> VM:
        vm = VM(self, name, mac)
        self.vms.append(vm)
        return vm
