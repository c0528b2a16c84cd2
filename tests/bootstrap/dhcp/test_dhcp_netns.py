"""pvsfarm's DHCP server against real clients, inside private network namespaces.

Topology per test: namespace ``sw`` holds bridge br0 (forward_delay 0, no STP);
each server and the client get their own namespace with an ``eth0`` veth
whose peer is a port of br0. Veths are created from inside ``sw``, so the
host's own namespace never sees an interface; the server sockets are opened
inside the server namespace (setns on this thread, then back) and served by
the test's event loop. Teardown kills the processes we started, by PID, and
deletes the namespaces.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.dhcp.server import open_dhcp_socket, start_dhcp_server
from pvsfarm.bootstrap.dhcp.session import DhcpSettings
from pvsfarm.bootstrap.dhcp.wire import (
    DhcpMessage, MessageType as MT, Op, parse, serialize,
)
from pvsfarm.lab.netns import Segment
from pvsfarm.views import DeviceView

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is missing"),
    pytest.mark.skipif(shutil.which("busybox") is None,
                       reason="busybox (udhcpc) is missing: apt install busybox"),
]

A = IPv4Address
SUBNET = IPv4Network("10.88.0.0/24")
MAC = MacAddress.parse("52:54:00:88:00:50")
UNKNOWN = MacAddress.parse("52:54:00:88:00:99")
CLONE_NEWNET = 0x40000000


class Inventory:
    def __init__(self, *devices: DeviceView) -> None:
        self.devices = {d.mac: d for d in devices}

    def device_by_mac(self, mac: MacAddress) -> DeviceView | None:
        return self.devices.get(mac)


INVENTORY = Inventory(DeviceView(MAC, "target1", A("10.88.0.50"), "lab", "win", True))


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread inside netns ``name`` (sockets made
    there stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns(back)")
    finally:
        os.close(own)
        os.close(target)


@pytest.fixture
def segment() -> Iterator[Segment]:
    seg = Segment("pvst-dhcp")
    try:
        yield seg
    finally:
        seg.delete()


@pytest.fixture
async def servers():
    """Start a DHCP server inside a namespace; all are closed at teardown."""
    handles = []

    async def start(ns: str, server_ip: str, on_unknown=None, **overrides):
        settings = DhcpSettings(interface="eth0", server_ip=A(server_ip), subnet=SUBNET,
                                routers=(A("10.88.0.254"),), dns_servers=(A("10.88.0.53"),),
                                **overrides)
        with in_netns(ns):
            sock = open_dhcp_socket("eth0")
        handle = await start_dhcp_server(settings, INVENTORY, sock=sock,
                                         on_unknown=on_unknown)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.close()


UDHCPC_SCRIPT = """#!/bin/sh
env | sort > "{out}.$1"
exit 0
"""


async def udhcpc(ns: str, tmp_path: Path, *extra: str) -> tuple[int, dict[str, str]]:
    """Run busybox udhcpc once (-q -n, 3 tries 1 s apart); return its exit
    code and the environment it gave the script on ``bound``."""
    out = tmp_path / f"udhcpc-{uuid.uuid4().hex[:6]}"
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(out=out))
    script.chmod(0o755)
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n",
        "-t", "3", "-T", "1", "-s", str(script), "-O", "tftp", "-O", "bootfile", *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        rc = await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    bound = Path(f"{out}.bound")
    env = dict(line.split("=", 1) for line in bound.read_text().splitlines()
               if "=" in line) if bound.exists() else {}
    return rc, env


async def test_udhcpc_gets_reservation_and_boot_file(segment, servers, tmp_path) -> None:
    srv = segment.host("srv1", addr="10.88.0.1/24")
    cli = segment.host("cli", mac=MAC)
    handle = await servers(srv, "10.88.0.1")
    rc, env = await udhcpc(cli, tmp_path, "-V", "PXEClient:Arch:00000:UNDI:002001")
    assert rc == 0
    assert env["ip"] == "10.88.0.50" and env["subnet"] == "255.255.255.0"
    assert env["router"].strip() == "10.88.0.254" and env["dns"].strip() == "10.88.0.53"
    assert env["serverid"] == "10.88.0.1" and env["siaddr"] == "10.88.0.1"
    assert env["boot_file"] == "undionly.kpxe" and env["bootfile"] == "undionly.kpxe"
    assert env["tftp"] == "10.88.0.1" and env["lease"] == "86400"
    assert handle.stats.replied >= 2  # OFFER + ACK

    rc, env = await udhcpc(cli, tmp_path, "-x", "0x5d:0007", "-x", "0x4d:69505845")
    assert rc == 0 and env["bootfile"] == "boot.ipxe"  # iPXE asks: script, not loader
    rc, env = await udhcpc(cli, tmp_path, "-x", "0x5d:0007")
    assert rc == 0 and env["bootfile"] == "ipxe.efi"


async def test_unknown_mac_gets_no_lease(segment, servers, tmp_path) -> None:
    srv = segment.host("srv1", addr="10.88.0.1/24")
    cli = segment.host("cli", mac=UNKNOWN)
    seen: list[MacAddress] = []
    await servers(srv, "10.88.0.1", on_unknown=lambda mac, msg: seen.append(mac))
    rc, env = await udhcpc(cli, tmp_path)
    assert rc != 0 and env == {}
    assert seen and set(seen) == {UNKNOWN}


@contextmanager
def client_socket(ns: str) -> Iterator[socket.socket]:
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 68))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def exchange(sock: socket.socket, msg: DhcpMessage, to: str, *, expect: int,
                   timeout_s: float = 3.0, linger_s: float = 0.2) -> list[DhcpMessage]:
    """Send ``msg``; collect replies until ``expect`` came (then ``linger_s``
    more, to catch extras) or ``timeout_s`` passed (a loaded CI box is slow)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, serialize(msg), (to, 67))
    replies: list[DhcpMessage] = []
    deadline = loop.time() + timeout_s
    while (left := deadline - loop.time()) > 0:
        try:
            data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), left)
        except asyncio.TimeoutError:
            break
        reply = parse(data)
        if reply.xid == msg.xid and reply.op == Op.BOOTREPLY:
            replies.append(reply)
            if len(replies) == expect:
                deadline = min(deadline, loop.time() + linger_s)
    return replies


def _client_msg(kind: MT, *options: tuple[int, bytes], **fields) -> DhcpMessage:
    return DhcpMessage(op=Op.BOOTREQUEST, xid=int.from_bytes(os.urandom(4), "big"),
                       chaddr=MAC, options=((53, bytes((kind,))), *options), **fields)


async def test_two_servers_answer_with_the_same_reservation(segment, servers, tmp_path) -> None:
    srv1 = segment.host("srv1", addr="10.88.0.1/24")
    srv2 = segment.host("srv2", addr="10.88.0.2/24")
    cli = segment.host("cli", mac=MAC, addr="10.88.0.200/24")
    await servers(srv1, "10.88.0.1")
    await servers(srv2, "10.88.0.2")
    with client_socket(cli) as sock:
        offers = await exchange(sock, _client_msg(MT.DHCPDISCOVER), "255.255.255.255",
                                expect=2)
        assert sorted(o.option(54) for o in offers) == [A("10.88.0.1").packed,
                                                        A("10.88.0.2").packed]
        assert {(o.yiaddr, o.file) for o in offers} == {(A("10.88.0.50"), b"undionly.kpxe")}
        assert {o.siaddr for o in offers} == {A("10.88.0.1"), A("10.88.0.2")}

        pick = _client_msg(MT.DHCPREQUEST, (54, A("10.88.0.2").packed),
                           (50, A("10.88.0.50").packed))
        acks = await exchange(sock, pick, "255.255.255.255", expect=1)
        assert [(a.option(53), a.option(54)) for a in acks] == [
            (bytes((MT.DHCPACK,)), A("10.88.0.2").packed)]

    rc, env = await udhcpc(cli, tmp_path)  # a real client takes one of the two
    assert rc == 0 and env["ip"] == "10.88.0.50"
    assert env["serverid"] in {"10.88.0.1", "10.88.0.2"}


async def test_renew_is_unicast_and_garbage_is_survived(segment, servers) -> None:
    srv = segment.host("srv1", addr="10.88.0.1/24")
    cli = segment.host("cli", mac=MAC, addr="10.88.0.50/24")
    handle = await servers(srv, "10.88.0.1")
    with client_socket(cli) as sock:
        loop = asyncio.get_running_loop()
        for junk in (b"", b"\x01" * 300, serialize(_client_msg(MT.DHCPDISCOVER))[:242]):
            await loop.sock_sendto(sock, junk, ("10.88.0.1", 67))
        renew = _client_msg(MT.DHCPREQUEST, ciaddr=A("10.88.0.50"))
        acks = await exchange(sock, renew, "10.88.0.1", expect=1)
    assert [a.option(53) for a in acks] == [bytes((MT.DHCPACK,))]
    assert acks[0].ciaddr == A("10.88.0.50") and acks[0].yiaddr == A("10.88.0.50")
    assert handle.stats.malformed == 3 and handle.stats.errors == 0


async def test_proxy_mode_offers_boot_info_and_answers_4011(segment, servers) -> None:
    srv = segment.host("srv1", addr="10.88.0.9/24")
    cli = segment.host("cli", mac=MAC, addr="10.88.0.50/24")
    with in_netns(srv):
        pxe_sock = open_dhcp_socket("eth0", 4011)
    settings = DhcpSettings(interface="eth0", server_ip=A("10.88.0.9"), subnet=SUBNET,
                            proxy_mode=True)
    with in_netns(srv):
        sock = open_dhcp_socket("eth0")
    handle = await start_dhcp_server(settings, INVENTORY, sock=sock, pxe_sock=pxe_sock)
    try:
        pxe = (60, b"PXEClient:Arch:00000:UNDI:002001")
        with client_socket(cli) as csock:
            offers = await exchange(csock, _client_msg(MT.DHCPDISCOVER, pxe),
                                    "255.255.255.255", expect=1)
            plain = await exchange(csock, _client_msg(MT.DHCPDISCOVER),
                                   "255.255.255.255", expect=1, timeout_s=0.3)
            loop = asyncio.get_running_loop()
            request = _client_msg(MT.DHCPREQUEST, pxe, (77, b"iPXE"), ciaddr=A("10.88.0.50"))
            await loop.sock_sendto(csock, serialize(request), ("10.88.0.9", 4011))
            data, source = await asyncio.wait_for(loop.sock_recvfrom(csock, 2048), 3)
    finally:
        handle.close()
    assert len(offers) == 1 and plain == []
    assert offers[0].yiaddr == A(0) and offers[0].file == b"undionly.kpxe"
    assert offers[0].option(60) == b"PXEClient" and offers[0].option(51) is None
    ack = parse(data)
    assert source == ("10.88.0.9", 4011) and ack.xid == request.xid
    assert ack.option(53) == bytes((MT.DHCPACK,)) and ack.file == b"boot.ipxe"


def _blocking_exchange(sock: socket.socket, msg: DhcpMessage, wait_s: float) -> list[DhcpMessage]:
    sock.setblocking(True)
    sock.settimeout(wait_s)
    sock.sendto(serialize(msg), ("255.255.255.255", 67))
    try:
        return [parse(sock.recvfrom(2048)[0])]
    except TimeoutError:
        return []


def test_serves_under_uvloop(segment) -> None:
    """The node runs on uvloop; its datagram transport must work with our
    socket. (uvloop lacks sock_recvfrom, so the client here is a thread.)"""
    uvloop = pytest.importorskip("uvloop")
    srv = segment.host("srv1", addr="10.88.0.1/24")
    cli = segment.host("cli", mac=MAC, addr="10.88.0.200/24")

    async def main() -> list[DhcpMessage]:
        settings = DhcpSettings(interface="eth0", server_ip=A("10.88.0.1"), subnet=SUBNET)
        with in_netns(srv):
            sock = open_dhcp_socket("eth0")
        async with await start_dhcp_server(settings, INVENTORY, sock=sock):
            with client_socket(cli) as csock:
                return await asyncio.to_thread(
                    _blocking_exchange, csock, _client_msg(MT.DHCPDISCOVER), 3.0)

    offers = uvloop.run(main())
    assert [o.yiaddr for o in offers] == [A("10.88.0.50")]
