"""Issue 7, boot ISO end to end: a QEMU target whose network offers no PXE at all boots from
``pvsfarm bootstrap iso`` to the login and the vDisk.

Topology: QEMU user-mode networking (slirp). Its DHCP hands out 10.0.2.15 with no boot
options (no ``tftp=``/``bootfile=`` on the netdev), and the e1000 NIC has no option ROM
(``romfile=``), so the only iPXE in the VM is the ISO's ``ipxe.lkrn``. The guest reaches the
host's loopback at 10.0.2.2: one real ``pvsfarm node`` (embedded SQLite) listens on 127.0.0.1
and advertises ``address: 10.0.2.2``, so the bootstrap, the login answer, the sanboot URL and
the NBD endpoint all point the guest there.

Chain: SeaBIOS → El Torito → ISOLINUX → ``ipxe.lkrn`` running the ISO's ``bootstrap.ipxe``
(plain ``dhcp``, then ``chain http://10.0.2.2:PORT/boot?mac=...``) → the node's login answer →
``sanboot`` of the vDisk over HTTP → SYSLINUX → Linux → the OS-stage agent (``agent.sh``) logs in
again, attaches the vDisk over NBD and prints the marker's sha256.

The kernel and initramfs come from the e2e artifact builders (shared cache); the vDisk is
built per run into the test's temporary directory, because its kernel command line carries
the login URL and the node's port is picked at random.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import pytest
from sqlalchemy import create_engine, text

from pvsfarm.bootstrap.iso import IsoSources
from tests.e2e import artifacts
from tests.e2e.harness import VM
from tests.nodes import RunningNode, admin, start_node

pytestmark = pytest.mark.e2e

MAC = "52:54:00:e2:15:01"
HOST_FROM_GUEST = "10.0.2.2"
"""slirp's alias of the host's loopback."""
GUEST_IP = "10.0.2.15"
"""slirp's first DHCP lease."""
BOOT_BUDGET_S = 90
MARKER = r"^pvsfarm-agent: MARKER sha256=([0-9a-f]{64}) server=(\S+) read=(\d+)"
DHCP_BOOT_OPTIONS = re.compile(
    r"\$\{(?:[\w-]+/)?(?:filename|next-server|root-path|66|67|17|150|210|209)(?::\w+)?\}|\bautoboot\b|\bpxebs\b|tftp",
    re.I)
"""What a script would use if it depended on DHCP boot options (66/67 file and server name,
17 root path, 150 TFTP server, 209/210 PXELINUX) or on PXE/TFTP."""


def _why_not_iso() -> str | None:
    for path, package in ((IsoSources().isolinux_bin, "isolinux"), (IsoSources().ldlinux_c32, "syslinux-common"),
                          (IsoSources().ipxe_lkrn, "ipxe")):
        if not path.exists():
            return f"the boot ISO needs {path} (Debian package {package}, tools/apt-packages.txt)"
    return None


def _why_not_boot() -> str | None:
    if os.geteuid() != 0:
        return "the ISO boot test needs root (shared e2e artifact cache, as the other QEMU e2e tests)"
    if shutil.which("qemu-system-x86_64") is None:
        return "the ISO boot test needs qemu-system-x86_64 (Debian package qemu-system-x86)"
    return _why_not_iso()


@dataclass
class IsoFarm:
    tmp: Path
    db_url: str
    node: RunningNode
    iso: Path
    issued: dict  # type: ignore[type-arg]
    disk: Path | None
    """The bootable vDisk; None when this host cannot boot VMs (``unavailable`` says why)."""
    marker_sha256: str
    unavailable: str

    @property
    def login_url(self) -> str:
        return f"http://{HOST_FROM_GUEST}:{self.node.http_port}"

    def sessions(self) -> list[dict]:  # type: ignore[type-arg]
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT s.name, ss.bytes_read, ss.ended_at IS NULL FROM stream_sessions ss "
                    "JOIN servers s ON s.id = ss.server_id JOIN devices d ON d.id = ss.device_id "
                    "WHERE d.mac = :mac ORDER BY ss.id"), {"mac": MAC}).fetchall()
        finally:
            engine.dispose()
        return [{"server": r[0], "bytes_read": r[1], "open": bool(r[2])} for r in rows]


class IsoVM(VM):
    """The e2e harness's VM (serial log, milestone watcher, ``wait_for``), booted from the CD-ROM
    on slirp instead of PXE on a tap."""

    def __init__(self, tmp: Path, name: str, mac: str, iso: Path) -> None:
        self.farm, self.name, self.mac = None, name, mac  # type: ignore[assignment]
        self.serial = tmp / f"{name}.serial"
        self.qemu_log = tmp / f"{name}.qemu.log"
        self.argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
                     "-nographic", "-monitor", "none", "-nodefaults", "-no-user-config", "-no-reboot",
                     "-serial", f"file:{self.serial}", "-cdrom", str(iso), "-boot", "d",
                     # slirp without tftp=/bootfile=: DHCP gives an address and nothing to boot.
                     "-netdev", "user,id=n0",
                     # romfile= (empty): no PXE ROM on the NIC, the ISO's iPXE is the only one.
                     "-device", f"e1000,netdev=n0,mac={mac},romfile="]
        self.seen: dict[str, float] = {}
        with self.qemu_log.open("wb") as out:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _read_iso(path: Path, rr_path: str) -> bytes:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=rr_path)
        return out.getvalue()
    finally:
        iso.close()


@pytest.fixture(scope="module")
def iso_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsoFarm]:
    """One node advertising 10.0.2.2, the bootable vDisk, a device for MAC, the ISO."""
    reason = _why_not_iso()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("iso-e2e")
    db_url = f"sqlite:///{tmp / 'farm.sqlite'}"
    admin(db_url, "db", "upgrade")
    node = start_node(tmp, "n1", db_url, address=HOST_FROM_GUEST)
    try:
        disk, marker_sha256, unavailable = _bootable_vdisk(tmp, f"http://{HOST_FROM_GUEST}:{node.http_port}")
        if disk is not None:
            admin(db_url, "vdisk", "add", "base", "--file", str(disk), "--no-copy", config=node.config)
            admin(db_url, "device", "add", "--mac", MAC, "--name", "isovm", "--vdisk", "base")
        admin(db_url, "bootstrap", "configure", "--server", "n1")
        iso = tmp / "boot.iso"
        issued = json.loads(admin(db_url, "bootstrap", "iso", "--out", str(iso), "--json"))
        yield IsoFarm(tmp, db_url, node, iso, issued, disk, marker_sha256, unavailable)
    finally:
        node.stop()


def _bootable_vdisk(tmp: Path, login_url: str) -> tuple[Path | None, str, str]:
    """The e2e kernel + initramfs (shared cache) on a vDisk whose kernel command line names
    ``login_url``: (disk, marker sha256, ""), or (None, "", why not) (the boot test then skips)."""
    reason = _why_not_boot()
    if reason:
        return None, "", reason
    missing = artifacts.missing_tools()
    if missing:
        return None, "", f"cannot build the e2e boot artifacts: missing {', '.join(missing)} (tools/apt-packages.txt)"
    try:
        kernel = artifacts.kernel()
        initrd = artifacts.initramfs(kernel)
    except artifacts.Unavailable as exc:
        return None, "", f"cannot build the e2e boot artifacts: {exc}"
    start = time.monotonic()
    disk = artifacts.vdisk(kernel, initrd, (login_url,), cache=tmp)
    print(f"\nISO e2e: kernel {kernel.version}, {initrd.name}; per-run vDisk built in {time.monotonic() - start:.1f} s")
    return disk, hashlib.sha256(artifacts.marker_bytes()).hexdigest(), ""


@pytest.fixture
def vm(iso_farm: IsoFarm) -> Iterator[list[IsoVM]]:
    """Holder of the test's VM; QEMU killed by PID in teardown."""
    holder: list[IsoVM] = []
    try:
        yield holder
    finally:
        for v in holder:
            v.stop()


def test_iso_script_needs_no_dhcp_boot_options(iso_farm: IsoFarm) -> None:
    """Cheap: what the ISO boots is self-contained — plain DHCP for an address, then absolute
    HTTP URLs of the listed servers; nothing read from DHCP boot options, no TFTP."""
    script = _read_iso(iso_farm.iso, "/isolinux/bootstrap.ipxe").decode()
    cfg = _read_iso(iso_farm.iso, "/isolinux/isolinux.cfg").decode()
    assert re.search(r"^\s*KERNEL ipxe\.lkrn$", cfg, re.M) and re.search(r"^\s*INITRD bootstrap\.ipxe$", cfg, re.M)
    lines = [line.strip() for line in script.splitlines()]
    assert lines[0] == "#!ipxe"
    commands = [line for line in lines if line and not line.startswith(("#", ":", "echo "))]
    dhcp = [i for i, line in enumerate(commands) if line.split()[0] == "dhcp"]
    chains = [line for line in commands if line.split()[0] in ("chain", "imgfetch", "kernel", "sanboot", "boot")]
    assert dhcp and dhcp[0] == 0, f"the script's first command is plain dhcp: {commands}"
    assert commands[0].split("&&")[0].strip() == "dhcp", "dhcp without options (no interface or filename args)"
    assert not DHCP_BOOT_OPTIONS.search("\n".join(commands)), script
    urls = [word for line in chains for word in line.split() if "://" in word]
    assert urls and all(u.startswith(f"{iso_farm.login_url}/boot?mac=") for u in urls), urls
    assert iso_farm.issued["servers"] == ["n1"] and iso_farm.issued["mode"] == "listed"


def test_vm_boots_from_iso_without_pxe_to_login_and_vdisk(iso_farm: IsoFarm, vm: list[IsoVM]) -> None:
    if iso_farm.disk is None:
        pytest.skip(iso_farm.unavailable)
    v = IsoVM(iso_farm.tmp, "isovm", MAC, iso_farm.iso)
    vm.append(v)
    netdev = v.argv[v.argv.index("-netdev") + 1]
    assert "bootfile=" not in netdev and "tftp=" not in netdev, "slirp must offer no boot options"
    deadline = time.monotonic() + BOOT_BUDGET_S
    steps: dict[str, float] = {}

    def step(name: str, pattern: str, after: int = 0) -> re.Match[str]:
        """Wait (within what is left of the boot budget) for a serial landmark; note when seen."""
        m = v.wait_for(pattern, max(1.0, deadline - time.monotonic()), after=after)
        steps[name] = v.elapsed()
        return m

    version = iso_farm.issued["bootstrap_version"]
    isolinux = step("isolinux", rf"^pvsfarm: starting iPXE \(bootstrap v{version}\)")
    step("iso_script", r"^pvsfarm: DHCP for an address", after=isolinux.end())
    dhcp = step("dhcp", rf"^Configuring \(net0 {MAC}\)[^\n]*ok")
    step("bootstrap", rf"^pvsfarm: login via n1$", after=dhcp.end())
    # iPXE prints the URI without its query: the MAC it sent shows in the node's sessions below.
    chain = step("login", rf"^{re.escape(iso_farm.login_url)}/boot\.\.\. ok$", after=dhcp.end())
    answer = step("answer", r"^pvsfarm: base from n1$", after=chain.end())
    step("sanboot", r"^Booting from SAN device 0x80", after=answer.end())
    step("syslinux", r"^SYSLINUX \d")
    step("agent", r"pvsfarm-agent: started")
    marker = step("marker", MARKER)
    seconds = v.elapsed()
    text_ = v.text()

    # iPXE came from the ISO (after ISOLINUX ran), not from a NIC ROM: the NIC has none.
    first_ipxe = text_.find("iPXE")
    assert 0 <= isolinux.start() < first_ipxe, v.tail()
    assert text_.count("iPXE initialising devices") == 1, v.tail()
    assert marker.group(1) == iso_farm.marker_sha256 and marker.group(2) == "n1"
    assert re.search(rf"pvsfarm-agent: dhcp {re.escape(GUEST_IP)} on eth0 \({MAC}\)", text_), v.tail()
    assert f"pvsfarm-agent: login via {iso_farm.login_url}: vdisk base on n1" in text_, v.tail()
    assert re.search(rf"attached /dev/nbd0 to {re.escape(HOST_FROM_GUEST)}:{iso_farm.node.nbd_port} \(n1\)", text_)

    # The node's side: both logins (iPXE's /boot with the MAC it sent, then the OS agent's
    # /boot.json) became stream sessions of this device on n1; the OS's is open with NBD reads,
    # and the node counts it as load. (The HTTP sanboot reads are not in bytes_read.)
    rows: list[dict] = []  # type: ignore[type-arg]
    end = time.monotonic() + 10
    while time.monotonic() < end:
        rows = iso_farm.sessions()
        if len(rows) >= 2 and rows[-1]["open"] and rows[-1]["bytes_read"] >= artifacts.MARKER_BYTES:
            break
        time.sleep(0.3)
    assert len(rows) >= 2 and all(r["server"] == "n1" for r in rows), rows
    assert rows[-1]["open"] and rows[-1]["bytes_read"] >= artifacts.MARKER_BYTES, rows
    assert "dhcp: off" in iso_farm.node.log.read_text(), "the node must not be a DHCP server here"
    servers = {s["name"]: s for s in json.loads(admin(iso_farm.db_url, "server", "list", "--json"))}
    assert servers["n1"]["state"] == "up" and servers["n1"]["load"] >= 1, servers
    assert seconds <= BOOT_BUDGET_S

    timeline = " ".join(f"{k}={t:.1f}" for k, t in sorted(steps.items(), key=lambda kv: kv[1]))
    print(f"\nBOOT-TIME isovm (ISO, no PXE): {seconds:.1f} s from QEMU start to the marker\n"
          f"  timeline (s): {timeline}\n  harness milestones (s): {v.timeline()}\n  sessions: {rows}")
