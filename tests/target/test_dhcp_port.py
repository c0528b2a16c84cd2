"""`DhcpPort`: many targets' DHCP exchanges on one client socket, replies routed by
(xid, chaddr). Driven through a fake transport: two "servers" answer every
broadcast, so each target sees two OFFERs and two ACK/NAKs, interleaved with the
others' replies, garbage and strangers' replies."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

import pytest

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.dhcp.wire import DhcpMessage, MessageType as MT, Op, OptionCode as O, parse, serialize
from pvsfarm.target.dhcp import DhcpPort, obtain_lease
from pvsfarm.target.errors import BootFailed

SERVERS = (IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2"))


def mac(i: int) -> MacAddress:
    return MacAddress(bytes((0x52, 0x54, 0, 0x33, 0, i)))


def reply(request: DhcpMessage, kind: MT, server: IPv4Address) -> bytes:
    assert isinstance(request.chaddr, MacAddress)
    return serialize(DhcpMessage(
        op=Op.BOOTREPLY, xid=request.xid, chaddr=request.chaddr,
        yiaddr=IPv4Address(f"10.9.1.{request.chaddr.packed[5]}"), options=(
            (O.DHCP_MESSAGE_TYPE, bytes((kind,))), (O.SERVER_IDENTIFIER, server.packed),
            (O.SUBNET_MASK, IPv4Address("255.255.0.0").packed), (O.BOOTFILE_NAME, b"boot.ipxe"))))


class FakeTransport:
    """Answers each client broadcast from both servers (stranger chatter in between)."""

    def __init__(self, port: DhcpPort, nak_for: set[MacAddress] = frozenset()) -> None:  # type: ignore[assignment]
        self.port, self.nak_for, self.sent = port, nak_for, 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def sendto(self, data: bytes, _addr: tuple[str, int]) -> None:
        self.sent += 1
        request = parse(data)
        loop = asyncio.get_running_loop()
        stranger = DhcpMessage(op=Op.BOOTREPLY, xid=request.xid ^ 1, chaddr=request.chaddr,
                               options=((O.DHCP_MESSAGE_TYPE, bytes((MT.DHCPOFFER,))),))
        loop.call_soon(self.port.datagram_received, serialize(stranger), ("10.9.0.3", 67))
        loop.call_soon(self.port.datagram_received, b"\x02garbage", ("10.9.0.3", 67))
        for server in SERVERS:
            if request.message_type is MT.DHCPDISCOVER:
                kind = MT.DHCPOFFER
            else:
                chosen = request.option(O.SERVER_IDENTIFIER) == server.packed
                # The other server NAKs the REQUEST naming its peer, as an authoritative dnsmasq does.
                kind = MT.DHCPNAK if request.chaddr in self.nak_for or not chosen else MT.DHCPACK
            loop.call_soon(self.port.datagram_received, reply(request, kind, server), (str(server), 67))


def shared_port(**kw: object) -> DhcpPort:
    port = DhcpPort()
    port.transport = FakeTransport(port, **kw)  # type: ignore[assignment,arg-type]
    return port


def test_concurrent_targets_share_one_port() -> None:
    async def storm() -> list[object]:
        port = shared_port()
        leases = await asyncio.gather(*(obtain_lease("fake0", mac(i), port=port, timeout_s=0.5)
                                        for i in range(1, 41)))
        assert port.waiting == {}  # every exchange unregistered itself
        assert port.unclaimed >= 2 * 40 * 2  # strangers' replies and garbage, both rounds
        return list(leases)

    leases = asyncio.run(storm())
    assert [str(lease.address) for lease in leases] == [f"10.9.1.{i}" for i in range(1, 41)]  # type: ignore[attr-defined]
    assert {lease.server_id for lease in leases} <= set(SERVERS)  # type: ignore[attr-defined]


def test_a_nak_ends_only_its_own_exchange() -> None:
    async def run() -> tuple[object, BaseException | object]:
        port = shared_port(nak_for={mac(2)})
        return tuple(await asyncio.gather(obtain_lease("fake0", mac(1), port=port, timeout_s=0.5),
                                          obtain_lease("fake0", mac(2), port=port, timeout_s=0.5),
                                          return_exceptions=True))  # type: ignore[return-value]

    ok, refused = asyncio.run(run())
    assert str(ok.address) == "10.9.1.1"  # type: ignore[attr-defined]
    assert isinstance(refused, BootFailed) and "DHCPNAK" in str(refused)


def test_silence_times_out_after_the_tries() -> None:
    class Mute:
        def is_closing(self) -> bool:
            return False

        def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
            pass

    async def run() -> None:
        port = DhcpPort()
        port.transport = Mute()  # type: ignore[assignment]
        await obtain_lease("fake0", mac(1), port=port, timeout_s=0.01, tries=2)

    with pytest.raises(BootFailed, match="no DHCPOFFER after 2 tries"):
        asyncio.run(run())


def test_one_xid_and_mac_cannot_wait_twice() -> None:
    port = DhcpPort()
    port.register(7, mac(1))
    with pytest.raises(BootFailed, match="already in use"):
        port.register(7, mac(1))
    port.register(7, mac(2))  # same xid, other target: fine (chaddr tells them apart)
    port.unregister(7, mac(1))
    port.register(7, mac(1))
