"""The simulated target's pieces without namespaces: bootstrap parsing, login query,
back-off, DHCP lease extraction, TFTP against our own server, NBD connect failure."""

from __future__ import annotations

import random
import socket
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.dhcp.wire import DhcpMessage, MessageType, Op, OptionCode as O
from pvsfarm.bootstrap.ipxe import Endpoint, bootstrap_script
from pvsfarm.bootstrap.tftp.server import TftpSettings, start_tftp_server
from pvsfarm.target.boot import backoff_s
from pvsfarm.target.dhcp import client_message, lease_from_ack
from pvsfarm.target.errors import BootFailed, StreamLost
from pvsfarm.target.login import LoginUrl, login_query, parse_bootstrap
from pvsfarm.target.nbd import NbdClient
from pvsfarm.target.tftp import tftp_get

MAC = MacAddress.parse("52:54:00:12:34:56")


def test_bootstrap_script_servers_are_found_in_order() -> None:
    script = bootstrap_script([Endpoint("a", "http://10.0.0.1:8080"), Endpoint("b", "http://10.0.0.2:80"),
                               Endpoint("a2", "http://10.0.0.1:8080")], 1500, 7)
    assert parse_bootstrap(script) == [LoginUrl("http://10.0.0.1:8080", 1.5), LoginUrl("http://10.0.0.2:80", 1.5)]


@pytest.mark.parametrize("text", ["echo hi\n", "#!ipxe\necho no servers\n", ""])
def test_bootstrap_without_servers_is_refused(text: str) -> None:
    with pytest.raises(BootFailed, match="tftp"):
        parse_bootstrap(text)


def test_login_query_percent_encodes_like_ipxe() -> None:
    assert login_query(MAC, None, ()) == "mac=52%3A54%3A00%3A12%3A34%3A56"
    assert login_query(MAC, "t/k+n", {"n2", "n1"}).endswith("&resume=t%2Fk%2Bn&exclude=n1,n2")


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(4)
    for attempt in range(40):
        assert 0 <= backoff_s(attempt, 0.2, 2.0, rng) <= min(2.0, 0.2 * 2 ** attempt)


def test_lease_from_ack() -> None:
    request = client_message(MessageType.DHCPREQUEST, MAC, 42)
    assert request.option(O.USER_CLASS) == b"iPXE" and request.option(O.CLIENT_SYSTEM_ARCHITECTURE) == b"\0\0"
    ack = DhcpMessage(op=Op.BOOTREPLY, xid=42, chaddr=MAC, yiaddr=IPv4Address("10.1.0.5"),
                      siaddr=IPv4Address("10.1.0.2"), file=b"undionly.kpxe", options=(
                          (O.DHCP_MESSAGE_TYPE, bytes((MessageType.DHCPACK,))),
                          (O.SERVER_IDENTIFIER, IPv4Address("10.1.0.1").packed),
                          (O.SUBNET_MASK, IPv4Address("255.255.0.0").packed),
                          (O.TFTP_SERVER_NAME, b"10.1.0.3"), (O.BOOTFILE_NAME, b"boot.ipxe")))
    lease = lease_from_ack(ack)
    assert (lease.address, lease.prefix_len, lease.server_id) == (IPv4Address("10.1.0.5"), 16, IPv4Address("10.1.0.1"))
    assert (lease.tftp_server, lease.boot_file) == (IPv4Address("10.1.0.3"), "boot.ipxe")
    with pytest.raises(BootFailed, match="no boot file"):
        lease_from_ack(DhcpMessage(op=Op.BOOTREPLY, xid=1, chaddr=MAC, yiaddr=IPv4Address("10.1.0.5")))


@pytest.mark.parametrize("size", [0, 100, 1468, 1468 * 3 + 7])
async def test_tftp_get_from_our_server(tmp_path: Path, size: int) -> None:
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    (tmp_path / "file.bin").write_bytes(payload)
    server = await start_tftp_server(TftpSettings(root=tmp_path, host="127.0.0.1", port=0),
                                     lambda name, _peer: b"#!ipxe\n" if name == "boot.ipxe" else None)
    try:
        assert await tftp_get(IPv4Address("127.0.0.1"), "file.bin", port=server.port) == payload
        assert await tftp_get(IPv4Address("127.0.0.1"), "boot.ipxe", port=server.port) == b"#!ipxe\n"
        with pytest.raises(BootFailed, match="server error 1"):
            await tftp_get(IPv4Address("127.0.0.1"), "missing", port=server.port)
    finally:
        server.close()


async def test_tftp_silence_is_bounded() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))
        with pytest.raises(BootFailed, match="no answer"):
            await tftp_get(IPv4Address("127.0.0.1"), "x", port=mute.getsockname()[1], timeout_s=0.05, retries=2)


async def test_nbd_connect_refused_is_a_lost_stream() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StreamLost):
        await NbdClient.connect("127.0.0.1", port, "x", timeout_s=1)
