"""The QEMU path of ``pvsfarm demo``: one VM PXE-boots Linux from the demo farm, then loses its node.

The VM (``qemu-system-x86_64 -accel tcg``, virtio NIC whose option ROM is iPXE) sits on a
tap on the demo bridge, inside the bridge's namespace, next to the IPv6 router advertiser
(without one iPXE waits ~15 s for a router). Its chain, every step served by the demo's
``pvsfarm node`` processes: DHCP reservation → TFTP ``boot.ipxe`` → login → ``sanboot`` of
the vDisk over HTTP from the assigned node → SYSLINUX → Linux → the OS-stage agent logs in
again, attaches the vDisk over NBD and prints the marker's sha256 and the serving node on
the serial console. The demo then SIGKILLs that node and watches the agent fail over.

The timeline comes from the serial console (iPXE's and the agent's lines, timed as they
appear) and the farm database (which nodes streamed to the VM). QEMU and the RA sender are
killed by PID in ``Demo.cleanup``; the tap goes with the namespace.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvsfarm.lab import RA_SCRIPT
from pvsfarm.lab.artifacts import BootArtifacts, Unavailable, build_all, missing_tools
from pvsfarm.lab.netns import ip

if TYPE_CHECKING:
    from pvsfarm.demo import Demo

VM_NAME = "vm1"
VM_MAC, VM_IP = "52:54:00:79:00:50", "10.79.0.50"
VM_DEADLINE_S = 85.0
"""Farm start → failover seen (issue: the VM path under 90 s); a TCG boot takes ~20-30 s."""
BOOTSTRAP_TIMEOUT_MS = 3000
QEMU_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")
"""virtio-net-pci's default option ROM (Debian's ipxe-qemu), found by QEMU on its firmware path."""
MARKER = re.compile(r"^pvsfarm-agent: MARKER sha256=([0-9a-f]{64}) server=(n\d) read=(\d+)", re.M)
NO_BOOT = re.compile(r"No bootable device|Nothing to boot|Kernel panic|pvsfarm-agent: FATAL", re.M)
_NEXT_SERVER = re.compile(r"^Next server: (\S+)", re.M)
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_c])")


def login_urls() -> tuple[str, ...]:
    from pvsfarm.demo import NODES

    return tuple(f"http://{a}:8080" for a in NODES.values())


def why_not() -> str | None:
    """Why this machine cannot run the VM path (None: it can, artifacts permitting)."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86 ipxe-qemu)"
    if not QEMU_ROM.exists():
        return f"the iPXE NIC ROM {QEMU_ROM} is missing (apt-get install ipxe-qemu)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (no tap devices)"
    missing = missing_tools()
    if missing:
        return "missing tools to build the boot artifacts: " + ", ".join(missing)
    return None


def artifacts_or_why(say: Callable[[str], None]) -> BootArtifacts | str:
    """The VM's boot artifacts (kernel, initramfs, vDisk; built once, then cached), or why not."""
    reason = why_not()
    if reason:
        return reason
    say("  qemu-system-x86_64 found: preparing the VM's kernel, initramfs and vDisk (cached after the first run)")
    try:
        art = build_all(login_urls())
    except Unavailable as exc:
        return f"cannot build the boot artifacts: {exc}"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"building the boot artifacts failed: {exc}"
    say(f"  kernel {art.kernel.version}, vDisk {art.disk.name} "
        f"({'built in %.1f s' % art.build_s if art.build_s else 'from the cache'})")
    return art


class SerialWatch:
    """Puts serial-console landmarks on the demo timeline as they first appear."""

    def __init__(self, demo: Demo, path: Path, marker_sha: str) -> None:
        from pvsfarm.demo import _names

        self.demo, self.path, self.marker_sha = demo, path, marker_sha
        self.names = _names()
        self.seen: set[tuple[str, int]] = set()
        self.killed: str | None = None
        self.killed_at: float | None = None
        self.markers: list[tuple[float, str, str, int]] = []
        """(time, sha256, server, end offset) of every MARKER line seen."""
        self.assigned: str | None = None
        self.failover: tuple[float, str, str] | None = None

    def text(self) -> str:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ""
        return _ANSI.sub("", raw.decode("latin-1")).replace("\r", "")

    def node(self, addr_or_url: str) -> str:
        return self.names.get(addr_or_url.rstrip("/"), addr_or_url)

    def poll(self) -> str:
        """New landmarks, in console order (the timeline's sort is stable on time)."""
        text, now = self.text(), time.monotonic()
        full = text
        text = text[: text.rfind("\n") + 1]  # complete lines only: the console is written as it goes
        new = []
        for key, regex in RULES:
            for m in regex.finditer(text):
                if key == "dhcp" and not _NEXT_SERVER.search(text, m.end()):
                    continue  # iPXE prints "Next server:" just after the lease: wait for it (next poll)
                if (key, m.start()) not in self.seen and (key in REPEATING or m.start() == regex.search(text).start()):
                    self.seen.add((key, m.start()))
                    new.append((m.start(), key, m))
        for _start, key, m in sorted(new, key=lambda x: x[0]):
            self._event(key, m, text, now)
        return full

    def _event(self, key: str, m: re.Match[str], text: str, now: float) -> None:
        say = self.demo.tl.at
        if key == "ipxe":
            say(now, VM_NAME, "iPXE (the NIC's option ROM) starts: DHCP on net0")
        elif key == "dhcp":
            nxt = _NEXT_SERVER.search(text, m.end())
            lease = m.group(1)
            server = self.node(nxt.group(1)) if nxt else "?"
            say(now, VM_NAME, f"DHCP   lease {lease} from {server} (iPXE; offer's next-server {server})")
        elif key == "tftp":
            say(now, VM_NAME, f"TFTP   boot.ipxe from {self.node(m.group(1))} (the bootstrap script)")
        elif key == "login":
            via = re.search(r"^pvsfarm: login via (n\d)", text[:m.start()], re.M)
            self.assigned = m.group(2)
            say(now, VM_NAME, f"login  answered by {via.group(1) if via else m.group(2)} (iPXE): vDisk {m.group(1)} "
                              f"assigned to {m.group(2)}")
        elif key == "sanboot":
            say(now, VM_NAME, f"sanboot vDisk over HTTP from {self.assigned or '?'} (iPXE hands the disk to the BIOS)")
        elif key == "syslinux":
            say(now, VM_NAME, "SYSLINUX from the vDisk loads Linux and the initramfs")
        elif key == "agent":
            say(now, VM_NAME, f"Linux {m.group(1)} up: the OS-stage agent starts")
        elif key == "os_dhcp":
            say(now, VM_NAME, f"DHCP   (OS) lease {m.group(1)} from {self.node(m.group(2))}")
        elif key == "os_login":
            say(now, VM_NAME, f"login  (OS) answered by {self.node(m.group(1))}: vDisk {m.group(2)} on {m.group(3)}")
        elif key == "nbd":
            say(now, VM_NAME, f"NBD    vDisk attached as {m.group(1)} from {m.group(3)} ({m.group(2)})")
        elif key == "read_failed":
            say(now, VM_NAME, f"read failed on {m.group(1)}: its node is gone")
        elif key == "relogin":
            self.failover = (now, m.group(2), m.group(3))
            after = f", {now - self.killed_at:.1f} s after the kill" if self.killed_at else ""
            say(now, VM_NAME, f"FAILOVER {m.group(2)} -> {m.group(3)} (relogin via {self.node(m.group(1))}, "
                              f"session {'resumed' if m.group(4) == 'true' else 'new'}{after})")
        elif key == "marker":
            sha, server = m.group(1), m.group(2)
            self.markers.append((now, sha, server, m.end()))
            first_from = [x for x in self.markers if x[2] == server]
            if len(first_from) == 1:  # one line per serving node; the agent reads every second
                ok = "verified" if sha == self.marker_sha else f"MISMATCH (expected {self.marker_sha})"
                say(now, VM_NAME, f"MARKER sha256={sha} {ok}, served by {server} (read {m.group(3)}, over NBD)")


RULES = [(key, re.compile(rx, re.M)) for key, rx in (
    ("ipxe", r"^iPXE initialising devices"),
    ("dhcp", r"^net0: (10\.[\d./]+)"),
    ("tftp", r"^tftp://([\d.]+)/boot\.ipxe\.\.\. ok"),
    ("login", r"^pvsfarm: (\S+) from (n\d)"),
    ("sanboot", r"^Booting from SAN device"),
    ("syslinux", r"^SYSLINUX \d"),
    ("agent", r"pvsfarm-agent: started \(kernel ([^,\s]+)"),
    ("os_dhcp", r"pvsfarm-agent: dhcp (\S+) on \S+ \(\S+\) from (\S+)"),
    ("os_login", r"pvsfarm-agent: login via (\S+): vdisk (\S+) on (n\d)"),
    ("nbd", r"pvsfarm-agent: attached (\S+) to (\S+) \((n\d)\)"),
    ("read_failed", r"pvsfarm-agent: read failed on (n\d)"),
    ("relogin", r"pvsfarm-agent: relogin via (\S+): (n\d) -> (n\d) \(resumed=(\w+)"),
    ("marker", MARKER.pattern),
)]
REPEATING = {"nbd", "read_failed", "relogin", "marker"}
"""Landmarks that recur (every attach, failover and read); the others count once."""


def _power_on(demo: Demo) -> tuple[subprocess.Popen[bytes], Path]:

    assert demo.seg is not None
    sw, tap = demo.seg.sw, f"tap-{VM_NAME}"
    ip("-n", sw, "tuntap", "add", "dev", tap, "mode", "tap")
    ip("-n", sw, "link", "set", tap, "master", "br0", "up")
    serial = demo.tmp / f"{VM_NAME}.serial"
    argv = ["ip", "netns", "exec", sw, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
            # -nographic: only then SeaBIOS and iPXE mirror their text to the serial port
            "-nographic", "-monitor", "none", "-nodefaults", "-no-user-config", "-no-reboot",
            "-serial", f"file:{serial}",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={VM_MAC}", "-boot", "n"]
    with (demo.tmp / f"{VM_NAME}.qemu.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    demo.procs.append(proc)
    return proc, serial


def _start_ra(demo: Demo) -> None:
    assert demo.seg is not None
    with (demo.tmp / "ra.log").open("wb") as out:
        demo.procs.append(subprocess.Popen(["ip", "netns", "exec", demo.seg.sw, sys.executable, str(RA_SCRIPT), "br0"],
                                           stdout=out, stderr=subprocess.STDOUT))


def _wait(demo: Demo, watch: SerialWatch, qemu: subprocess.Popen[bytes], what: str,
          done: Callable[[str], bool]) -> None:
    from pvsfarm.demo import DemoError

    while True:
        text = watch.poll()
        if done(text):
            return
        tail = "\n".join(text.splitlines()[-25:])
        if NO_BOOT.search(text):
            raise DemoError(f"the VM did not boot ({NO_BOOT.search(text).group(0)}):\n{tail}")  # type: ignore[union-attr]
        if qemu.poll() is not None:
            log = (demo.tmp / f"{VM_NAME}.qemu.log").read_text(errors="replace")[-1000:]
            raise DemoError(f"QEMU exited ({qemu.returncode}) before {what}:\n{log}\n{tail}")
        if demo.left_s() < 0:
            raise DemoError(f"no {what} within the demo's {VM_DEADLINE_S:.0f} s:\n{tail}")
        time.sleep(0.1)


def _sessions(demo: Demo) -> list[tuple[str, int]]:
    """(server, bytes read) of the VM's stream sessions, as the farm database has them."""
    import sqlalchemy as sa

    engine = sa.create_engine(demo.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT s.name, ss.bytes_read FROM stream_sessions ss JOIN servers s ON s.id = ss.server_id "
                "JOIN devices d ON d.id = ss.device_id WHERE d.mac = :mac ORDER BY ss.id"), {"mac": VM_MAC}).fetchall()
    except sa.exc.SQLAlchemyError:
        return []
    finally:
        engine.dispose()
    return [(r[0], int(r[1] or 0)) for r in rows]


def run_vm(demo: Demo, art: BootArtifacts) -> dict[str, Any]:
    """Farm up, VM boots, its serving node is killed, the agent fails over; the timeline."""
    demo.deadline = time.monotonic() + VM_DEADLINE_S
    demo.start_farm(targets=False)
    _start_ra(demo)
    demo.register(art.disk, {VM_NAME: (VM_MAC, VM_IP)}, timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    qemu, serial = _power_on(demo)
    started = time.monotonic()
    demo.tl.at(started, "farm", f"powered on QEMU VM {VM_NAME} ({VM_MAC}; TCG, iPXE NIC ROM, tap on the demo bridge)")
    watch = SerialWatch(demo, serial, art.marker_sha256)
    _wait(demo, watch, qemu, "marker line (Linux booted from the vDisk)", lambda _t: bool(watch.markers))
    booted_s = watch.markers[0][0] - started
    victim = watch.markers[0][2]
    survivor = next(n for n in demo.nodes if n != victim)
    demo.nodes[victim].send_signal(signal.SIGKILL)
    demo.nodes[victim].wait(10)
    watch.killed, watch.killed_at = victim, time.monotonic()
    demo.tl.at(watch.killed_at, "farm", f"kill -9 {victim} (it serves the VM's vDisk over NBD)")
    _wait(demo, watch, qemu, f"failover to {survivor}",
          lambda _t: watch.failover is not None and any(m[2] != victim for m in watch.markers))
    recovered = next(m for m in watch.markers if m[2] != victim)
    time.sleep(1.2)  # the survivor's session journal reaches the database every heartbeat (0.5 s)
    sessions = _sessions(demo)
    return _finish_vm(demo, watch, art, booted_s, victim, recovered, sessions)


def _finish_vm(demo: Demo, watch: SerialWatch, art: BootArtifacts, booted_s: float, victim: str,
               recovered: tuple[float, str, str, int], sessions: list[tuple[str, int]]) -> dict[str, Any]:
    tl = demo.tl
    assert watch.killed_at is not None
    failover_s = recovered[0] - watch.killed_at
    if sessions:
        tl.now("farm", "database: the VM's stream sessions " + ", ".join(f"{s} ({b >> 10} KiB read)" for s, b in sessions))
    tl.events.sort(key=lambda e: e[0])
    demo.say("\ntimeline (sorted):")
    for at, who, what in tl.events:
        demo.say(f"  t+{at:6.2f} s  {who:4s}  {what}")
    verified = all(m[1] == art.marker_sha256 for m in watch.markers)
    demo.say(f"\nsummary: VM {VM_NAME} booted Linux from the farm in {booted_s:.1f} s (QEMU start -> marker), "
             f"vDisk served by {victim}; {victim} killed; failed over to {recovered[2]} in {failover_s:.1f} s; "
             f"{len(watch.markers)} marker read(s), {'all verified' if verified else 'MISMATCH'}; "
             f"total {time.monotonic() - tl.t0:.1f} s")
    if not verified:
        from pvsfarm.demo import DemoError

        raise DemoError("the VM read a marker that does not match the vDisk's")
    return {"vm": VM_NAME, "killed": victim, "survivor": recovered[2], "boot_s": booted_s, "failover_s": failover_s,
            "marker_sha256": art.marker_sha256, "sessions": sessions}
