"""TFTP codec: vectors both ways, round trips, any bytes → message or MalformedMessage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvsfarm.bootstrap.tftp.wire import (
    Ack,
    Data,
    Error,
    ErrorCode,
    Message,
    Opcode,
    OptionAck,
    ReadRequest,
    TransferMode,
    WriteRequest,
    data_header,
    parse,
    serialize,
)
from pvsfarm.errors import LocalProtocolError, MalformedMessage

VECTORS: list[tuple[bytes, Message]] = [
    (b"\x00\x01boot.ipxe\x00octet\x00", ReadRequest("boot.ipxe")),
    (b"\x00\x01a/b.bin\x00netascii\x00", ReadRequest("a/b.bin", TransferMode.NETASCII)),
    (
        b"\x00\x01f\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x008\x00",
        ReadRequest("f", TransferMode.OCTET, (("blksize", "1468"), ("tsize", "0"), ("windowsize", "8"))),
    ),
    (b"\x00\x02up.bin\x00octet\x00", WriteRequest("up.bin")),
    (b"\x00\x03\x00\x01hello", Data(1, b"hello")),
    (b"\x00\x03\xff\xff", Data(65535, b"")),
    (b"\x00\x04\x00\x00", Ack(0)),
    (b"\x00\x04\x12\x34", Ack(0x1234)),
    (b"\x00\x05\x00\x01File not found\x00", Error(ErrorCode.FILE_NOT_FOUND, "File not found")),
    (b"\x00\x05\x00\x08\x00", Error(ErrorCode.OPTION_NEGOTIATION, "")),
    (b"\x00\x05\x00\x63odd\x00", Error(99, "odd")),
    (b"\x00\x06blksize\x001468\x00tsize\x001048576\x00", OptionAck((("blksize", "1468"), ("tsize", "1048576")))),
    (b"\x00\x06", OptionAck(())),
]


@pytest.mark.parametrize(("raw", "msg"), VECTORS)
def test_vectors_parse(raw: bytes, msg: Message) -> None:
    assert parse(raw) == msg


@pytest.mark.parametrize(("raw", "msg"), VECTORS)
def test_vectors_serialize(raw: bytes, msg: Message) -> None:
    assert serialize(msg) == raw


LENIENT = [
    # option names are case-insensitive (RFC 2347), modes too (RFC 1350)
    (b"\x00\x01F\x00OCTET\x00BlkSize\x00512\x00", ReadRequest("F", TransferMode.OCTET, (("blksize", "512"),))),
    # one trailing empty string after the options (PXE ROM padding)
    (b"\x00\x01f\x00octet\x00tsize\x000\x00\x00", ReadRequest("f", options=(("tsize", "0"),))),
    (b"\x00\x04\x00\x07\x00\x00", Ack(7)),  # ACK padded
    (b"\x00\x05\x00\x00no nul", Error(ErrorCode.NOT_DEFINED, "no nul")),
]


@pytest.mark.parametrize(("raw", "msg"), LENIENT)
def test_lenient_parse(raw: bytes, msg: Message) -> None:
    assert parse(raw) == msg


MALFORMED = [
    b"",
    b"\x00",
    b"\x00\x00",
    b"\x00\x07abc",
    b"\xff\xff",
    b"\x00\x01nonul",
    b"\x00\x01f\x00",  # no mode
    b"\x00\x01f\x00binary\x00",  # unknown mode
    b"\x00\x01f\x00octet\x00blksize\x00",  # option without value
    b"\x00\x01\xff\xfe\x00octet\x00",  # not UTF-8
    b"\x00\x03\x00",
    b"\x00\x04\x00",
    b"\x00\x05\x00",
    b"\x00\x06blksize\x00",
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse(raw)


def test_serialize_refuses_unencodable() -> None:
    with pytest.raises(LocalProtocolError):
        serialize(ReadRequest("a\0b"))
    with pytest.raises(LocalProtocolError):
        serialize(Ack(65536))


def test_data_header_and_opcodes() -> None:
    assert data_header(0x0102) == b"\x00\x03\x01\x02"
    assert Opcode.OACK == 6 and ErrorCode.UNKNOWN_TID == 5


text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30)
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=12)
options = st.lists(st.tuples(names, text), max_size=5).map(tuple)
block = st.integers(0, 0xFFFF)
messages = st.one_of(
    st.builds(ReadRequest, text, st.sampled_from(TransferMode), options),
    st.builds(WriteRequest, text, st.sampled_from(TransferMode), options),
    st.builds(Data, block, st.binary(max_size=600)),
    st.builds(Ack, block),
    st.builds(Error, st.sampled_from(ErrorCode) | st.integers(9, 0xFFFF), text),
    st.builds(OptionAck, options),
)


@given(messages)
def test_round_trip(msg: Message) -> None:
    assert parse(serialize(msg)) == msg


@given(st.binary(max_size=80))
def test_any_bytes_give_message_or_malformed(raw: bytes) -> None:
    try:
        msg = parse(raw)
    except MalformedMessage:
        return
    assert isinstance(msg, (ReadRequest, WriteRequest, Data, Ack, Error, OptionAck))


@given(st.sampled_from([1, 2, 5, 6]), st.lists(st.binary(max_size=8), max_size=6))
def test_nul_separated_garbage(op: int, fields: list[bytes]) -> None:
    raw = op.to_bytes(2, "big") + b"\0".join(fields) + b"\0"
    try:
        parse(raw)
    except MalformedMessage:
        pass
