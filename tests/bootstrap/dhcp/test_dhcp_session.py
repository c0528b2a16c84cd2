"""DHCP decisions, driven with messages only (no sockets)."""

from __future__ import annotations

import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.dhcp.session import DhcpResponder, DhcpSettings, Reply
from pvsfarm.bootstrap.dhcp.wire import (
    FLAG_BROADCAST, PXE_PORT, DhcpMessage, MessageType as MT, Op, OptionCode as O,
    decode_suboptions, parse, serialize,
)
from pvsfarm.errors import ConfigError, MalformedMessage
from pvsfarm.views import DeviceView

A = IPv4Address
MAC = MacAddress.parse("52:54:00:77:00:50")
OFF_MAC = MacAddress.parse("52:54:00:77:00:51")
ELSEWHERE_MAC = MacAddress.parse("52:54:00:77:00:52")
UNKNOWN_MAC = MacAddress.parse("52:54:00:77:00:99")
SERVER = A("10.77.0.1")
SETTINGS = DhcpSettings(
    interface="br0", server_ip=SERVER, subnet=IPv4Network("10.77.0.0/24"),
    routers=(A("10.77.0.254"),), dns_servers=(A("10.77.0.53"), A("10.77.0.54")),
    lease_s=3600, ipxe_script_url="http://10.77.0.1:8080/bootstrap.ipxe")


class Inventory:
    def __init__(self, *devices: DeviceView) -> None:
        self.devices = {d.mac: d for d in devices}

    def device_by_mac(self, mac: MacAddress) -> DeviceView | None:
        return self.devices.get(mac)


INVENTORY = Inventory(
    DeviceView(MAC, "target1", A("10.77.0.50"), "lab", "win", True),
    DeviceView(OFF_MAC, "target2", A("10.77.0.51"), "lab", "win", False),
    DeviceView(ELSEWHERE_MAC, "target3", A("10.99.0.5"), "lab", "win", True),
)


def request(kind: MT, mac: MacAddress = MAC, *, options: tuple = (), **fields) -> DhcpMessage:
    return DhcpMessage(op=Op.BOOTREQUEST, xid=0xABCD, chaddr=mac,
                       options=((53, bytes((kind,))), *options), **fields)


def respond(msg: DhcpMessage, settings: DhcpSettings = SETTINGS, **kw) -> Reply | None:
    # Always through the codec, as the server does.
    reply = DhcpResponder(settings, INVENTORY).respond(parse(serialize(msg)), **kw)
    if reply is not None:
        assert parse(serialize(reply.message)) == reply.message
    return reply


def opts(reply: Reply) -> dict[int, bytes]:
    return dict(reply.message.options)


def test_discover_gets_offer_with_reservation_and_settings() -> None:
    reply = respond(request(MT.DHCPDISCOVER))
    assert reply is not None
    m = reply.message
    assert m.op == Op.BOOTREPLY and m.xid == 0xABCD and m.chaddr == MAC
    assert m.yiaddr == A("10.77.0.50") and m.ciaddr == A(0)
    assert m.siaddr == SERVER and m.file == b"undionly.kpxe"
    o = opts(reply)
    assert [c for c, _ in m.options[:4]] == [53, 54, 51, 1]
    assert o[53] == bytes((MT.DHCPOFFER,)) and o[54] == SERVER.packed
    assert o[51] == struct.pack("!I", 3600) and o[1] == A("255.255.255.0").packed
    assert o[3] == A("10.77.0.254").packed
    assert o[6] == A("10.77.0.53").packed + A("10.77.0.54").packed
    assert o[66] == b"10.77.0.1" and o[67] == b"undionly.kpxe"
    assert 60 not in o and 175 not in o and 12 not in o
    assert (reply.address, reply.port) == (A("255.255.255.255"), 68)


def test_parameter_request_list_order_is_honoured() -> None:
    reply = respond(request(MT.DHCPDISCOVER, options=((55, bytes([67, 12, 6, 3, 66])),)))
    codes = [c for c, _ in reply.message.options]
    assert codes[:4] == [53, 54, 51, 1]
    assert codes[4:9] == [67, 12, 6, 3, 66]
    assert opts(reply)[12] == b"target1"


@pytest.mark.parametrize("arch,loader", [
    (b"\x00\x00", b"undionly.kpxe"), (b"\x00\x07", b"ipxe.efi"),
    (b"\x00\x09", b"ipxe.efi"), (b"\x00\x06", b"ipxe.efi"),
])
def test_option_93_chooses_loader(arch: bytes, loader: bytes) -> None:
    reply = respond(request(MT.DHCPDISCOVER, options=((93, arch),)))
    assert reply.message.file == loader and opts(reply)[67] == loader


def test_unknown_arch_gets_address_without_boot_info() -> None:
    reply = respond(request(MT.DHCPDISCOVER, options=((93, b"\x00\x0b"),)))
    assert reply.message.yiaddr == A("10.77.0.50")
    assert reply.message.file == b"" and reply.message.siaddr == A(0)
    assert 66 not in opts(reply) and 67 not in opts(reply)


@pytest.mark.parametrize("user_class", [b"iPXE", b"\x04iPXE", b"\x03foo\x04iPXE"])
def test_ipxe_gets_script_and_no_pxedhcp(user_class: bytes) -> None:
    reply = respond(request(MT.DHCPDISCOVER, options=((77, user_class), (93, b"\0\x07"))))
    o = opts(reply)
    assert o[67] == b"http://10.77.0.1:8080/bootstrap.ipxe"
    assert reply.message.file == b"http://10.77.0.1:8080/bootstrap.ipxe"
    assert dict(decode_suboptions(o[175])) == {176: b"\x01"}


def test_ipxe_priority_and_no_pxedhcp_off() -> None:
    settings = replace(SETTINGS, ipxe_priority=10, ipxe_no_pxedhcp=False)
    reply = respond(request(MT.DHCPDISCOVER, options=((77, b"iPXE"),)), settings)
    assert dict(decode_suboptions(opts(reply)[175])) == {1: b"\x0a"}


def test_pxeclient_vendor_class_is_echoed() -> None:
    reply = respond(request(MT.DHCPDISCOVER,
                            options=((60, b"PXEClient:Arch:00000:UNDI:002001"),)))
    o = opts(reply)
    assert o[60] == b"PXEClient"
    assert dict(decode_suboptions(o[43])) == {6: b"\x08"}


def test_client_identifier_and_relay_info_echoed() -> None:
    reply = respond(request(MT.DHCPDISCOVER, options=((61, b"\x01" + MAC.packed), (82, b"\x01\x02ab"))))
    assert opts(reply)[61] == b"\x01" + MAC.packed and opts(reply)[82] == b"\x01\x02ab"


@pytest.mark.parametrize("mac", [UNKNOWN_MAC, OFF_MAC, ELSEWHERE_MAC])
def test_unknown_disabled_or_other_subnet_get_nothing(mac: MacAddress) -> None:
    assert respond(request(MT.DHCPDISCOVER, mac)) is None
    assert respond(request(MT.DHCPREQUEST, mac, options=((50, b"\x0a\x4d\x00\x33"),))) is None


def test_on_unknown_is_called_with_mac() -> None:
    seen = []
    responder = DhcpResponder(SETTINGS, INVENTORY, lambda mac, msg: seen.append((mac, msg.xid)))
    assert responder.respond(request(MT.DHCPDISCOVER, UNKNOWN_MAC)) is None
    assert responder.respond(request(MT.DHCPDISCOVER, OFF_MAC)) is None
    assert seen == [(UNKNOWN_MAC, 0xABCD)]


def test_bootreply_and_plain_bootp_dropped() -> None:
    offer = respond(request(MT.DHCPDISCOVER)).message
    assert respond(offer) is None
    assert respond(DhcpMessage(op=Op.BOOTREQUEST, xid=1, chaddr=MAC)) is None
    non_ethernet = DhcpMessage(op=Op.BOOTREQUEST, xid=1, htype=6, chaddr=bytes(16),
                               options=((53, b"\x01"),))
    assert respond(non_ethernet) is None


SELECTING = ((54, SERVER.packed), (50, A("10.77.0.50").packed))


def test_request_selecting_ack() -> None:
    reply = respond(request(MT.DHCPREQUEST, options=SELECTING))
    o = opts(reply)
    assert o[53] == bytes((MT.DHCPACK,)) and reply.message.yiaddr == A("10.77.0.50")
    assert o[51] == struct.pack("!I", 3600)
    assert o[58] == struct.pack("!I", 1800) and o[59] == struct.pack("!I", 3150)


def test_request_for_other_server_is_ignored() -> None:
    other = ((54, A("10.77.0.2").packed), (50, A("10.77.0.50").packed))
    assert respond(request(MT.DHCPREQUEST, options=other)) is None


def test_request_selecting_without_option_50_is_ignored() -> None:
    assert respond(request(MT.DHCPREQUEST, options=((54, SERVER.packed),))) is None


@pytest.mark.parametrize("options,fields", [
    (((54, SERVER.packed), (50, A("10.77.0.77").packed)), {}),   # selecting
    (((50, A("10.77.0.77").packed),), {}),                       # init-reboot
    ((), {"ciaddr": A("10.77.0.77")}),                           # renewing
])
def test_request_for_wrong_address_is_naked(options: tuple, fields: dict) -> None:
    reply = respond(request(MT.DHCPREQUEST, options=options, **fields))
    m = reply.message
    assert opts(reply)[53] == bytes((MT.DHCPNAK,)) and opts(reply)[54] == SERVER.packed
    assert m.yiaddr == A(0) and m.ciaddr == A(0) and m.file == b""
    assert 51 not in opts(reply)
    assert (reply.address, reply.port) == (A("255.255.255.255"), 68)


def test_init_reboot_ack() -> None:
    reply = respond(request(MT.DHCPREQUEST, options=((50, A("10.77.0.50").packed),)))
    assert opts(reply)[53] == bytes((MT.DHCPACK,))
    assert reply.address == A("255.255.255.255")


def test_renew_acks_unicast_to_ciaddr() -> None:
    reply = respond(request(MT.DHCPREQUEST, ciaddr=A("10.77.0.50")))
    assert opts(reply)[53] == bytes((MT.DHCPACK,))
    assert reply.message.ciaddr == A("10.77.0.50")
    assert (reply.address, reply.port) == (A("10.77.0.50"), 68)


def test_request_without_any_state_is_ignored() -> None:
    assert respond(request(MT.DHCPREQUEST)) is None


def test_broadcast_bit_and_relay_addressing() -> None:
    reply = respond(request(MT.DHCPREQUEST, ciaddr=A("10.77.0.50"), flags=FLAG_BROADCAST))
    assert reply.address == A("255.255.255.255") and reply.message.flags == FLAG_BROADCAST
    relayed = respond(request(MT.DHCPDISCOVER, giaddr=A("10.77.0.254"), hops=1))
    assert (relayed.address, relayed.port) == (A("10.77.0.254"), 67)
    assert relayed.message.giaddr == A("10.77.0.254")
    assert respond(request(MT.DHCPDISCOVER, giaddr=A("10.1.1.1"))) is None


def test_inform_ack_without_yiaddr_or_lease() -> None:
    reply = respond(request(MT.DHCPINFORM, ciaddr=A("10.77.0.50")))
    o = opts(reply)
    assert o[53] == bytes((MT.DHCPACK,)) and reply.message.yiaddr == A(0)
    assert 51 not in o and 58 not in o and o[1] == A("255.255.255.0").packed
    assert (reply.address, reply.port) == (A("10.77.0.50"), 68)


def test_release_and_decline_get_no_reply(caplog: pytest.LogCaptureFixture) -> None:
    assert respond(request(MT.DHCPRELEASE, ciaddr=A("10.77.0.50"),
                           options=((54, SERVER.packed),))) is None
    assert respond(request(MT.DHCPDECLINE, options=SELECTING)) is None
    assert "DHCPDECLINE" in caplog.text and "10.77.0.50" in caplog.text


PROXY = replace(SETTINGS, proxy_mode=True, server_ip=A("10.77.0.9"),
                subnet=IPv4Network("10.77.0.0/24"))
PXE = (60, b"PXEClient:Arch:00007:UNDI:003016")


def test_proxy_offer_has_boot_info_only() -> None:
    reply = respond(request(MT.DHCPDISCOVER, options=(PXE, (93, b"\0\x07"))), PROXY)
    m, o = reply.message, opts(reply)
    assert m.yiaddr == A(0) and m.siaddr == A("10.77.0.9") and m.file == b"ipxe.efi"
    assert o[60] == b"PXEClient" and o[67] == b"ipxe.efi" and o[54] == A("10.77.0.9").packed
    assert not {1, 3, 6, 28, 51, 58, 59} & o.keys()
    assert reply.address == A("255.255.255.255")


def test_proxy_ignores_non_pxe_and_port_67_requests() -> None:
    assert respond(request(MT.DHCPDISCOVER), PROXY) is None
    assert respond(request(MT.DHCPREQUEST, options=(PXE, *SELECTING)), PROXY) is None
    assert respond(request(MT.DHCPDISCOVER, UNKNOWN_MAC, options=(PXE,)), PROXY) is None


def test_proxy_answers_4011_request_to_its_source() -> None:
    msg = request(MT.DHCPREQUEST, options=(PXE, (77, b"iPXE")), ciaddr=A("10.77.0.50"))
    reply = respond(msg, PROXY, local_port=PXE_PORT, source=(A("10.77.0.50"), 4011))
    assert opts(reply)[53] == bytes((MT.DHCPACK,)) and reply.message.yiaddr == A(0)
    assert opts(reply)[67] == b"http://10.77.0.1:8080/bootstrap.ipxe" and 175 in opts(reply)
    assert (reply.address, reply.port) == (A("10.77.0.50"), 4011)


@pytest.mark.parametrize("change", [
    {"server_ip": A("10.1.1.1")}, {"lease_s": 0}, {"bios_loader": ""},
    {"ipxe_script_url": "x" * 300}, {"ipxe_priority": 500},
])
def test_settings_validation(change: dict) -> None:
    with pytest.raises(ConfigError):
        replace(SETTINGS, **change)


@pytest.mark.parametrize("data", [
    b"\x01" * 100,                                              # truncated
    serialize(request(MT.DHCPDISCOVER)) + bytes(2000),          # oversize
    b"\x01" * 236 + b"\0\0\0\0" + b"\x35\x01\x01",              # bad cookie
    serialize(request(MT.DHCPDISCOVER))[:240] + b"\x35\x05\x01",  # option past the end
])
def test_garbage_never_reaches_the_responder(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse(data)
