"""DHCP codec: hand-made vectors both ways, hypothesis round trip and fuzz."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings, strategies as st

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.dhcp import wire
from pvsfarm.bootstrap.dhcp.wire import (
    DhcpMessage, MessageType, Op, OptionCode, decode_suboptions, encode_suboptions,
    ipxe_options, parse, pxe_vendor_options, serialize,
)
from pvsfarm.errors import MalformedMessage

MAC = MacAddress.parse("52:54:00:77:00:50")


def _fixed(op: str, flags: str, ci: str = "00000000", gi: str = "00000000",
           htype_hlen: str = "0106", chaddr: str = "525400770050" + "00" * 10,
           sname: bytes = b"", file: bytes = b"") -> bytes:
    return bytes.fromhex(
        op + htype_hlen + "00"          # op, htype, hlen, hops
        + "3903f326"                    # xid
        + "0004" + flags                # secs=4, flags
        + ci + "00000000" + "00000000" + gi
        + chaddr
    ) + sname.ljust(64, b"\0") + file.ljust(128, b"\0") + bytes.fromhex("63825363")


def _pad300(data: bytes) -> bytes:
    return data + bytes(300 - len(data))


# A DISCOVER as the QEMU iPXE ROM sends it (trimmed): broadcast bit set,
# 53=DISCOVER, 55=[1,3,6,66,67,175], 93=BIOS, 77="iPXE", 60=PXEClient...
DISCOVER_BYTES = _pad300(_fixed("01", "8000") + bytes.fromhex(
    "350101"
    "37060103064243af"
    "5d020000"
    "4d0469505845"
    "3c09" + b"PXEClient".hex() +
    "ff"))
DISCOVER = DhcpMessage(
    op=Op.BOOTREQUEST, xid=0x3903F326, chaddr=MAC, secs=4, flags=0x8000,
    options=((53, b"\x01"), (55, bytes([1, 3, 6, 66, 67, 175])), (93, b"\0\0"),
             (77, b"iPXE"), (60, b"PXEClient")))

# A relayed OFFER with sname/file set and a non-Ethernet chaddr (htype 6, hlen 6).
OFFER_BYTES = _pad300(
    _fixed("02", "0000", gi="0a4d00fe", htype_hlen="0606", sname=b"srv1",
           file=b"undionly.kpxe")
    + bytes.fromhex("350102" "3604" "0a4d0001" "ff"))
OFFER = DhcpMessage(
    op=Op.BOOTREPLY, xid=0x3903F326, htype=6, hlen=6,
    chaddr=bytes.fromhex("525400770050" + "00" * 10), secs=4,
    giaddr=IPv4Address("10.77.0.254"), sname=b"srv1", file=b"undionly.kpxe",
    options=((53, b"\x02"), (54, IPv4Address("10.77.0.1").packed)))

VECTORS = [(DISCOVER_BYTES, DISCOVER), (OFFER_BYTES, OFFER)]


@pytest.mark.parametrize("data,message", VECTORS)
def test_vectors_parse(data: bytes, message: DhcpMessage) -> None:
    assert parse(data) == message


@pytest.mark.parametrize("data,message", VECTORS)
def test_vectors_serialize(data: bytes, message: DhcpMessage) -> None:
    assert serialize(message) == data


def test_parse_tolerates_pads_trailing_data_and_missing_end() -> None:
    head = _fixed("01", "0000")
    with_pads = head + bytes.fromhex("00 00 350103 00 ff") + b"junk after end"
    assert parse(with_pads).options == ((53, b"\x03"),)
    assert parse(head + bytes.fromhex("350103")).options == ((53, b"\x03"),)
    assert parse(head).options == ()


def test_accessors() -> None:
    assert DISCOVER.message_type is MessageType.DHCPDISCOVER
    assert DISCOVER.broadcast
    assert DISCOVER.option(OptionCode.USER_CLASS) == b"iPXE"
    assert DISCOVER.option(OptionCode.HOST_NAME) is None
    split = DhcpMessage(op=Op.BOOTREQUEST, xid=1, chaddr=MAC,
                        options=((12, b"ab"), (53, b"\x09"), (12, b"cd")))
    assert split.option(12) == b"abcd"  # RFC 3396 concatenation
    assert split.message_type is None  # 9 is no DHCP type


def test_long_option_is_split_and_rejoined() -> None:
    msg = DhcpMessage(op=Op.BOOTREPLY, xid=7, chaddr=MAC, options=((67, b"x" * 600),))
    back = parse(serialize(msg))
    assert [len(v) for _, v in back.options] == [255, 255, 90]
    assert back.option(67) == b"x" * 600


@pytest.mark.parametrize("data,why", [
    (b"", "truncated"),
    (DISCOVER_BYTES[:239], "truncated"),
    (DISCOVER_BYTES + bytes(wire.MAX_MESSAGE_BYTES), "oversize"),
    (DISCOVER_BYTES[:236] + b"\x63\x82\x53\x64" + DISCOVER_BYTES[240:], "cookie"),
    (_fixed("01", "0000") + bytes.fromhex("3c09504f"), "past the end"),
    (_fixed("01", "0000") + bytes.fromhex("3c"), "no length"),
    (_fixed("03", "0000"), "bad op"),
    (_fixed("01", "0000", htype_hlen="0111"), "bad hlen"),
])
def test_malformed(data: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        parse(data)


def test_suboptions() -> None:
    assert ipxe_options() == bytes.fromhex("b00101ff")
    assert ipxe_options(priority=-1) == bytes.fromhex("0101ff" "b00101" "ff")
    assert decode_suboptions(ipxe_options(priority=10)) == ((1, b"\x0a"), (176, b"\x01"))
    assert pxe_vendor_options() == bytes.fromhex("060108ff")
    assert encode_suboptions([]) == b"\xff"
    with pytest.raises(MalformedMessage):
        decode_suboptions(b"\xb0\x05\x01")


# --- hypothesis --------------------------------------------------------------

_addr = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
_no_nul = lambda n: st.binary(max_size=n).filter(lambda b: b"\0" not in b)  # noqa: E731
_ethernet = st.tuples(st.just(1), st.just(6),
                      st.binary(min_size=6, max_size=6).map(MacAddress))
_other_hw = st.tuples(st.integers(0, 255), st.integers(0, 16),
                      st.binary(min_size=16, max_size=16)).filter(
                          lambda t: not (t[0] == 1 and t[1] == 6))


@st.composite
def messages(draw: st.DrawFn) -> DhcpMessage:
    htype, hlen, chaddr = draw(st.one_of(_ethernet, _other_hw))
    return DhcpMessage(
        op=draw(st.sampled_from(Op)), htype=htype, hlen=hlen, chaddr=chaddr,
        hops=draw(st.integers(0, 255)), xid=draw(st.integers(0, 2**32 - 1)),
        secs=draw(st.integers(0, 65535)), flags=draw(st.integers(0, 65535)),
        ciaddr=draw(_addr), yiaddr=draw(_addr), siaddr=draw(_addr), giaddr=draw(_addr),
        sname=draw(_no_nul(64)), file=draw(_no_nul(128)),
        options=tuple(draw(st.lists(st.tuples(st.integers(1, 254), st.binary(max_size=255)),
                                    max_size=4))))


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip(msg: DhcpMessage) -> None:
    data = serialize(msg)
    if len(data) <= wire.MAX_MESSAGE_BYTES:
        assert parse(data) == msg


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=1600),
                 st.binary(max_size=400).map(lambda tail: DISCOVER_BYTES[:240] + tail)))
def test_any_bytes_parse_or_malformed(data: bytes) -> None:
    try:
        msg = parse(data)
    except MalformedMessage:
        return
    assert isinstance(msg, DhcpMessage)
    msg.message_type  # must not raise either
