"""A three-node farm on loopback sharing one store, and simulated targets that check
every byte they read (issue 5: `tests/test_chaos.py` and `benchmarks/failover_bench.py`).

The farm: a throwaway PostgreSQL; nodes n1..n3 (real ``pvsfarm node`` processes)
configured with ``store: {path: <one directory>, shared: true}``; one
standard-image vDisk of random data whose write cache lives on the server, so
a target's writes sit in the shared store and follow it to its next server;
devices for the streaming targets and spare devices for boots later on.

A `Target` logs in through the bootstrap's servers (`stream_from_login`), then
loops: read a random chunk and compare its SHA-256 with what the target must
see there (the base, or what it wrote there itself), and now and then write a
chunk of its own. Every login answer is recorded with its time, so callers can
check which server was assigned when. `run_chaos` plays the whole scenario:
steady streaming, ``kill -9`` of the busiest node, a database outage with new
boots, and a drain.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from sqlalchemy import create_engine, text

from benchmarks.pg import ThrowawayPostgres
from pvsfarm.addr import MacAddress
from pvsfarm.errors import PvsfarmError
from pvsfarm.target.boot import Stream, TargetSettings, stream_from_login
from pvsfarm.target.login import LoginAnswer, LoginUrl, parse_bootstrap
from tests.nodes import RunningNode, admin, start_node

CHUNK_BYTES = 16 * 1024
"""Unit of reads, writes and checks: a quarter of a write-cache block, so writes are read-modify-write."""
DISK_BYTES = 4 << 20
NODES = ("n1", "n2", "n3")
VDISK = "base"
DEAD_AFTER_S = 5.0
"""The node default (`NodeConfig.dead_after_s`): heartbeats alone call a killed node dead after this."""
DRAIN_GRACE_S = 1.5
"""Three heartbeats (tests.nodes uses 0.5 s): nodes re-read server states every heartbeat (NOTIFY is quicker)."""
WRITES_PER_TARGET = 6
PROBE_MAC = "52:54:00:ff:ff:ff"


def mac_of(i: int) -> str:
    return f"52:54:00:0c:{i >> 8 & 255:02x}:{i & 255:02x}"


@dataclass(frozen=True)
class Disk:
    data: bytes

    @classmethod
    def random(cls, size: int = DISK_BYTES) -> Disk:
        return cls(os.urandom(size))

    @property
    def chunks(self) -> int:
        return len(self.data) // CHUNK_BYTES

    def digests(self) -> list[bytes]:
        return [hashlib.sha256(self.data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]).digest() for i in range(self.chunks)]


@dataclass(frozen=True, slots=True)
class Login:
    t: float
    """time.monotonic() when the answer arrived."""
    mac: str
    server: str
    via: str
    resumed: bool
    cache_lost: bool
    session: str


class Farm:
    """Context manager: PostgreSQL + three nodes + the vDisk, its copies, devices and bootstrap."""

    def __init__(self, tmp: Path, devices: int, spares: int) -> None:
        self.tmp, self.devices, self.spares = tmp, devices, spares
        self.disk = Disk.random()
        self.digests = self.disk.digests()
        self.pg = ThrowawayPostgres()
        self.nodes: dict[str, RunningNode] = {}
        self.store = tmp / "shared-store"
        self._hung: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Farm:
        self.pg.__enter__()
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        url = self.pg.url
        admin(url, "db", "upgrade")
        image = self.tmp / "base.img"
        image.write_bytes(self.disk.data)
        for name in NODES:
            self.nodes[name] = start_node(self.tmp, name, url, store={"path": str(self.store), "shared": True})
        admin(url, "vdisk", "add", VDISK, "--file", str(image), config=self.nodes["n1"].config)
        for name in NODES[1:]:
            self._record_copy(name)
        csv = self.tmp / "devices.csv"
        rows = [f"{mac_of(i)},t{i},{VDISK}\n" for i in range(self.devices + self.spares)]
        csv.write_text("mac,name,vdisk\n" + "".join(rows) + f"{PROBE_MAC},probe,{VDISK}\n")
        admin(url, "device", "import", "--csv", str(csv))
        admin(url, "bootstrap", "configure", *[a for n in NODES for a in ("--server", n)])

    def _record_copy(self, server: str) -> None:
        """``pvsfarm vdisk copy`` for ``server``. Its node may record the same row at the same
        moment (shared-store adoption, `store.replicate`): `add_copy` then fails on the unique
        (vdisk, server) constraint, and running it again re-verifies the row that won."""
        args = ("vdisk", "copy", VDISK, "--path", str(self.store / f"{VDISK}.img"), "--server", server)
        try:
            admin(self.pg.url, *args)
        except AssertionError as exc:
            if "uq_vdisk_copies_vdisk_server" not in str(exc):
                raise
            admin(self.pg.url, *args)

    def __exit__(self, *exc: object) -> None:
        for proc in self._hung:
            proc.kill()
            proc.wait(timeout=10)
        for node in self.nodes.values():
            node.stop()
        self.pg.__exit__()

    def kill(self, name: str, *, hang: bool = False) -> None:
        """``kill -9`` (the kernel resets its connections at once), or with ``hang`` SIGSTOP:
        a hung or cut-off server, whose connections just go quiet."""
        proc = self.nodes[name].proc
        if hang:
            proc.send_signal(signal.SIGSTOP)
            self._hung.append(proc)
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def verified_servers(self) -> set[str]:
        rows = json.loads(admin(self.pg.url, "vdisk", "status", VDISK, "--json"))
        return {r["server"] for r in rows if r["status"] == "verified"}

    async def cli(self, *args: str) -> str:
        """``pvsfarm --db URL ARGS`` in a subprocess (does not block the targets' loop)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVSFARM_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvsfarm", "--db", self.pg.url, *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise AssertionError(f"pvsfarm {' '.join(args)}: {err.decode()}")
        return out.decode()

    async def ready(self, timeout_s: float = 20.0) -> list[LoginUrl]:
        """Wait until every node serves logins for the vDisk from all three servers; the bootstrap's URLs."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            for node in self.nodes.values():
                while True:
                    async with http.get(f"{node.url}/boot.json?mac={PROBE_MAC}") as resp:
                        body = await resp.json()
                    if resp.status == 200 and len(body["farm"]) == len(NODES):
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{node.name} not ready: {body}")
                    await asyncio.sleep(0.2)
            async with http.get(f"{self.nodes['n1'].url}/bootstrap.ipxe") as resp:
                return parse_bootstrap(await resp.text())

    def session_servers(self) -> dict[str, str]:
        """stream_sessions token → server name, straight from the database."""
        engine = create_engine(self.pg.url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "select s.token, v.name from stream_sessions s join servers v on v.id = s.server_id")).all()
        finally:
            engine.dispose()
        return {token: name for token, name in rows}


@dataclass
class Target:
    """One simulated target streaming from the farm and checking what it reads."""

    mac: str
    disk: Disk
    digests: list[bytes]
    logins: list[Login]
    rng: random.Random
    stream: Stream | None = None
    written: dict[int, bytes] = field(default_factory=dict)
    """chunk → SHA-256 of what this target wrote there (acknowledged writes only)."""
    reads_ok: int = 0
    wrong_reads: int = 0
    lost_writes: int = 0
    writes_acked: int = 0
    error: str | None = None
    switches: list[tuple[float, str]] = field(default_factory=list)
    """(time, server) of the first good read on each server it streamed from."""

    def record(self, answer: LoginAnswer, via: str) -> None:
        self.logins.append(Login(time.monotonic(), self.mac, answer.server, via, answer.resumed,
                                 answer.cache_lost, answer.session))

    @property
    def server(self) -> str | None:
        return self.stream.answer.server if self.stream else None

    async def attach(self, urls: list[LoginUrl]) -> None:
        settings = TargetSettings(mac=MacAddress.parse(self.mac), iface="lo", read_bytes=CHUNK_BYTES,
                                  read_timeout_s=5.0)
        self.stream = await stream_from_login(urls, settings, on_login=self.record)

    async def check(self, chunk: int) -> None:
        assert self.stream is not None
        data = await self.stream.read(chunk * CHUNK_BYTES, CHUNK_BYTES)
        expected = self.written.get(chunk, self.digests[chunk])
        if hashlib.sha256(data).digest() != expected:
            if chunk in self.written:
                self.lost_writes += 1
            else:
                self.wrong_reads += 1
            return
        self.reads_ok += 1
        server = self.stream.answer.server
        if not self.switches or self.switches[-1][1] != server:
            self.switches.append((time.monotonic(), server))

    async def write(self) -> None:
        assert self.stream is not None
        chunk = self.rng.choice([c for c in range(self.disk.chunks) if c not in self.written])
        data = self.rng.randbytes(CHUNK_BYTES)
        await self.stream.write(chunk * CHUNK_BYTES, data)
        self.written[chunk] = hashlib.sha256(data).digest()
        self.writes_acked += 1

    async def run(self, stop: asyncio.Event, pause_s: float) -> None:
        """Read, write now and then, read own writes back, until ``stop``; a boot failure ends it."""
        n = 0
        try:
            while not stop.is_set():
                n += 1
                if n % 10 == 3 and len(self.written) < WRITES_PER_TARGET:
                    await self.write()
                elif self.written and n % 7 == 0:
                    await self.check(self.rng.choice(list(self.written)))
                else:
                    await self.check(self.rng.randrange(self.disk.chunks))
                await asyncio.sleep(pause_s * self.rng.uniform(0.5, 1.5))
        except PvsfarmError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def finish(self) -> None:
        """Read back every acknowledged write, then disconnect."""
        try:
            for chunk in sorted(self.written):
                await self.check(chunk)
        except PvsfarmError as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        if self.stream is not None and self.stream.client is not None:
            await self.stream.client.close()

    def first_good_read_after(self, t: float, not_on: str) -> float | None:
        return next((at for at, server in self.switches if at > t and server != not_on), None)


@dataclass
class BootResult:
    mac: str
    started: float
    ok: bool
    server: str | None = None
    session: str | None = None
    seconds: float = 0.0
    error: str | None = None


async def boot_once(farm: Farm, urls: list[LoginUrl], mac: str, logins: list[Login], reads: int = 8) -> BootResult:
    """A new target: log in, read ``reads`` random chunks (all must verify), disconnect."""
    t = Target(mac, farm.disk, farm.digests, logins, random.Random(mac))
    result = BootResult(mac, time.monotonic(), ok=False)
    try:
        await t.attach(urls)
        for _ in range(reads):
            await t.check(t.rng.randrange(farm.disk.chunks))
        assert t.stream is not None
        result.server, result.session = t.stream.answer.server, t.stream.answer.session
        result.ok = t.wrong_reads == 0 and t.reads_ok == reads
        if not result.ok:
            result.error = f"{t.wrong_reads} wrong reads"
    except PvsfarmError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        await t.finish()
    result.seconds = time.monotonic() - result.started
    return result


@dataclass
class Outcome:
    logins: list[Login]
    targets: list[Target]
    verified: set[str]
    killed: str = ""
    kill_t: float = 0.0
    failover_s: dict[str, float] = field(default_factory=dict)
    """mac → seconds from the kill to the target's first good read on its new server."""
    not_recovered: list[str] = field(default_factory=list)
    outage: tuple[float, float] = (0.0, 0.0)
    outage_boots: list[BootResult] = field(default_factory=list)
    written_back: dict[str, str] = field(default_factory=dict)
    """Outage sessions found in stream_sessions after the database came back: token → server."""
    writeback_s: float | None = None
    drained: str = ""
    drain_t: float = 0.0
    drain_boots: list[BootResult] = field(default_factory=list)


async def run_chaos(farm: Farm, *, targets: int = 60, warmup_s: float = 3.0, outage_s: float = 20.0,
                    outage_boots: int = 20, drain_boots: int = 10, pause_s: float = 0.05, hang: bool = False,
                    say=print) -> Outcome:  # type: ignore[no-untyped-def]
    """Stream → kill -9 (or, with ``hang``, SIGSTOP) the busiest node → database outage with
    new boots → drain a survivor."""
    assert farm.spares >= outage_boots + drain_boots
    t0, tell = time.monotonic(), say
    say = lambda line: tell(f"[{time.monotonic() - t0:5.1f} s] {line}")  # noqa: E731
    urls = await farm.ready()
    logins: list[Login] = []
    fleet = [Target(mac_of(i), farm.disk, farm.digests, logins, random.Random(i)) for i in range(targets)]
    await asyncio.gather(*(t.attach(urls) for t in fleet))
    out = Outcome(logins, fleet, await asyncio.to_thread(farm.verified_servers))
    say(f"{targets} targets attached: {dict(sorted(Counter(t.server for t in fleet).items()))}")
    stop = asyncio.Event()
    runs = [asyncio.create_task(t.run(stop, pause_s)) for t in fleet]
    try:
        await asyncio.sleep(warmup_s)
        await _kill_busiest(farm, fleet, out, hang, say)
        await _outage(farm, urls, out, outage_s, outage_boots, say)
        await _drain(farm, urls, out, drain_boots, say)
    finally:
        stop.set()
        await asyncio.gather(*runs)
        await asyncio.gather(*(t.finish() for t in fleet))
        say("targets stopped")
    return out


async def _kill_busiest(farm: Farm, fleet: list[Target], out: Outcome, hang: bool,
                        say) -> None:  # type: ignore[no-untyped-def]
    load = Counter(t.server for t in fleet)
    out.killed = min(load, key=lambda name: (-load[name], name))
    affected = [t for t in fleet if t.server == out.killed]
    out.kill_t = time.monotonic()
    farm.kill(out.killed, hang=hang)
    say(f"{'kill -STOP' if hang else 'kill -9'} {out.killed} ({len(affected)} targets on it)")
    deadline = out.kill_t + 20.0
    while time.monotonic() < deadline:
        if all(t.first_good_read_after(out.kill_t, out.killed) or t.error for t in affected):
            break
        await asyncio.sleep(0.05)
    for t in affected:
        at = t.first_good_read_after(out.kill_t, out.killed)
        if at is None:
            out.not_recovered.append(t.mac)
        else:
            out.failover_s[t.mac] = at - out.kill_t


async def _outage(farm: Farm, urls: list[LoginUrl], out: Outcome, outage_s: float, boots: int,
                  say) -> None:  # type: ignore[no-untyped-def]
    await asyncio.to_thread(farm.pg.stop, "immediate")
    start = time.monotonic()
    say(f"PostgreSQL stopped; {boots} new targets boot over {outage_s:.0f} s")

    async def later(i: int) -> BootResult:
        await asyncio.sleep(i * (outage_s - 3.0) / max(1, boots))
        return await boot_once(farm, urls, mac_of(len(out.targets) + i), out.logins)

    out.outage_boots = list(await asyncio.gather(*(later(i) for i in range(boots))))
    await asyncio.sleep(max(0.0, start + outage_s - time.monotonic()))
    out.outage = (start, time.monotonic())
    await asyncio.to_thread(farm.pg.start_again)
    back = time.monotonic()
    say(f"PostgreSQL back after {back - start:.1f} s")
    wanted = {b.session for b in out.outage_boots if b.session}
    while time.monotonic() < back + 30.0:
        try:
            rows = await asyncio.to_thread(farm.session_servers)
        except Exception:  # noqa: BLE001 - the cluster may still be starting up
            rows = {}
        out.written_back = {k: v for k, v in rows.items() if k in wanted}
        if len(out.written_back) == len(wanted):
            out.writeback_s = time.monotonic() - back
            break
        await asyncio.sleep(0.25)


async def _drain(farm: Farm, urls: list[LoginUrl], out: Outcome, boots: int,
                 say) -> None:  # type: ignore[no-untyped-def]
    if boots <= 0:
        return
    out.drained = min(n for n in NODES if n != out.killed)
    await farm.cli("server", "drain", out.drained)
    out.drain_t = time.monotonic()
    say(f"drained {out.drained}; {boots} new targets boot")
    await asyncio.sleep(DRAIN_GRACE_S)
    first = len(out.targets) + len(out.outage_boots)
    out.drain_boots = list(await asyncio.gather(
        *(boot_once(farm, urls, mac_of(first + i), out.logins) for i in range(boots))))
