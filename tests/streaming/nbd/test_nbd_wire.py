"""NBD codec: vector tables both ways, stream feeding, round trips, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvsfarm.errors import MalformedMessage
from pvsfarm.streaming.nbd import wire
from pvsfarm.streaming.nbd.wire import (
    ClientFlags,
    ExportNameReply,
    InfoRequest,
    OptionReply,
    OptionRequest,
    Request,
    ServerEntry,
    ServerGreeting,
    SimpleReply,
)

H = bytes.fromhex

# (bytes on the wire, message) -- hand-assembled from the spec's field diagrams
VECTORS = [
    (H("4e42444d41474943" "49484156454f5054" "0003"), ServerGreeting(3)),
    (H("00000001"), ClientFlags(1)),
    (H("49484156454f5054" "00000003" "00000000"), OptionRequest(wire.Opt.LIST)),
    (H("49484156454f5054" "00000001" "00000003") + b"abc", OptionRequest(wire.Opt.EXPORT_NAME, b"abc")),
    (H("0003e889045565a9" "00000003" "00000001" "00000000"), OptionReply(3, wire.Rep.ACK)),
    (H("0003e889045565a9" "00000007" "80000006" "00000002") + b"no", OptionReply(7, wire.Rep.ERR_UNKNOWN, b"no")),
    (H("25609513" "0001" "0001" "0102030405060708" "0000000000001000" "00000200"),
     Request(1, wire.Cmd.WRITE, 0x0102030405060708, 4096, 512)),
    (H("25609513" "0000" "0000" "ffffffffffffffff" "0000000000000000" "00001000"),
     Request(0, wire.Cmd.READ, 2**64 - 1, 0, 4096)),
    (H("67446698" "00000016" "000000000000002a"), SimpleReply(22, 42)),
    # structured chunks: OFFSET_DATA (DONE; 512 bytes of data at 4096 follow) and ERROR EINVAL "hi"
    (H("668e33ef" "0001" "0001" "0000000000000007" "00000208" "0000000000001000"),
     wire.StructuredChunk(1, wire.ReplyType.OFFSET_DATA, 7, 520, H("0000000000001000"))),
    (H("668e33ef" "0001" "8001" "0000000000000009" "00000008" "00000016" "0002") + b"hi",
     wire.StructuredChunk(1, wire.ReplyType.ERROR, 9, 8, H("00000016" "0002") + b"hi")),
]


def test_structured_chunk_fast_paths_match_the_vectors() -> None:
    assert wire.encode_read_chunk(7, 4096, 512) == VECTORS[-2][0]
    assert wire.encode_error_chunk(22, 9, b"hi") == VECTORS[-1][0]
    assert VECTORS[-1][1].error() == (22, "hi")


@pytest.mark.parametrize(("raw", "msg"), VECTORS)
def test_vectors_both_directions(raw: bytes, msg) -> None:
    assert msg.encode() == raw
    assert type(msg).decode(raw) == (msg, len(raw))


@pytest.mark.parametrize(("raw", "msg"), VECTORS)
def test_stream_byte_by_byte_and_trailing(raw: bytes, msg) -> None:
    decode = type(msg).decode
    for cut in range(len(raw)):  # every proper prefix: "need more", never an error
        assert decode(raw[:cut]) is None
    assert decode(raw + b"\x25\x60trailing") == (msg, len(raw))
    assert decode(memoryview(bytearray(raw))) == (msg, len(raw))


def test_export_name_reply_with_and_without_zeroes() -> None:
    raw = H("0000000000100000" "0103")
    assert ExportNameReply(1 << 20, 0x103, zeroes=False).encode() == raw
    assert ExportNameReply(1 << 20, 0x103).encode() == raw + bytes(124)
    assert ExportNameReply.decode(raw + bytes(124)) == (ExportNameReply(1 << 20, 0x103), 134)
    assert ExportNameReply.decode(raw, zeroes=False) == (ExportNameReply(1 << 20, 0x103, False), 10)
    assert ExportNameReply.decode(raw + bytes(100)) is None


PAYLOAD_VECTORS = [
    (H("00000002") + b"vd" + H("0002" "0001" "0003"), InfoRequest("vd", (1, 3))),
    (H("00000000" "0000"), InfoRequest("", ())),
    (H("00000004") + b"disk" + b"base image", ServerEntry("disk", "base image")),
]


@pytest.mark.parametrize(("raw", "msg"), PAYLOAD_VECTORS)
def test_option_payload_vectors(raw: bytes, msg) -> None:
    assert msg.encode() == raw
    assert type(msg).decode(raw) == msg


INFO_VECTORS = [
    (H("0000" "0000000000001000" "0103"), wire.InfoExport(4096, 0x103)),
    (H("0001") + b"vd", wire.InfoName("vd")),
    (H("0002") + "é".encode(), wire.InfoDescription("é")),
    (H("0003" "00000001" "00001000" "02000000"), wire.InfoBlockSize(1, 4096, 32 << 20)),
]


@pytest.mark.parametrize(("raw", "msg"), INFO_VECTORS)
def test_info_vectors(raw: bytes, msg) -> None:
    assert msg.encode() == raw
    assert wire.decode_info(raw) == msg


@pytest.mark.parametrize(
    ("decoder", "raw"),
    [
        (ServerGreeting.decode, b"NBDMAGIC" + b"IHAVEOPX" + b"\0\1"),
        (OptionRequest.decode, b"IHAVEOPX" + bytes(8)),
        (OptionReply.decode, bytes(20)),
        (Request.decode, H("25609514") + bytes(24)),
        (SimpleReply.decode, H("67446699") + bytes(12)),
        (wire.StructuredChunk.decode, H("668e33ee") + bytes(16)),
        (wire.StructuredChunk.decode, H("668e33ef" "0001" "0001" "0000000000000007" "00000004") + bytes(8)),
        (InfoRequest.decode, H("00000009" "0000")),  # name longer than the data
        (InfoRequest.decode, H("00000000" "0002" "0001")),  # says 2 requests, has 1
        (InfoRequest.decode, H("00000002") + b"\xff\xfe" + H("0000")),  # not UTF-8
        (InfoRequest.decode, H("00000002") + b"a\0" + H("0000")),  # NUL in a string
        (ServerEntry.decode, H("00000005") + b"abc"),
        (wire.decode_info, H("0009")),
        (wire.decode_info, H("0000" "00")),  # mis-sized NBD_INFO_EXPORT
    ],
)
def test_malformed_inputs_raise_malformed(decoder, raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decoder(raw)


def test_option_length_past_max_is_malformed_before_data_arrives() -> None:
    header = wire._OPT_HDR.pack(wire.IHAVEOPT, 1, 65537)
    with pytest.raises(MalformedMessage, match="exceeds"):
        OptionRequest.decode(header, max_data=65536)
    assert OptionRequest.decode(header, max_data=65537) is None  # waits for the data


def test_long_string_is_rejected_both_ways() -> None:
    with pytest.raises(ValueError):
        wire.encode_string("x" * 4097)
    with pytest.raises(MalformedMessage):
        wire.decode_string(b"x" * 4097)
    assert wire.decode_string(b"x" * 4096) == "x" * 4096


# --- hypothesis ---------------------------------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
nbd_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)

messages = st.one_of(
    st.builds(ServerGreeting, u16),
    st.builds(ClientFlags, u32),
    st.builds(OptionRequest, u32, st.binary(max_size=64)),
    st.builds(OptionReply, u32, u32, st.binary(max_size=64)),
    st.builds(Request, u16, u16, u64, u64, u32),
    st.builds(SimpleReply, u32, u64),
)


@given(messages, st.binary(max_size=8))
def test_roundtrip_messages(msg, trailing: bytes) -> None:
    raw = msg.encode()
    assert type(msg).decode(raw + trailing) == (msg, len(raw))


@given(st.builds(ExportNameReply, u64, u16, st.booleans()))
def test_roundtrip_export_name_reply(msg: ExportNameReply) -> None:
    assert ExportNameReply.decode(msg.encode(), zeroes=msg.zeroes) == (msg, len(msg.encode()))


payloads = st.one_of(
    st.builds(InfoRequest, nbd_text, st.lists(u16, max_size=5).map(tuple)),
    st.builds(ServerEntry, nbd_text, nbd_text),
)


@given(payloads)
def test_roundtrip_option_payloads(msg) -> None:
    assert type(msg).decode(msg.encode()) == msg


infos = st.one_of(
    st.builds(wire.InfoExport, u64, u16),
    st.builds(wire.InfoName, nbd_text),
    st.builds(wire.InfoDescription, nbd_text),
    st.builds(wire.InfoBlockSize, u32, u32, u32),
)


@given(infos)
def test_roundtrip_infos(msg) -> None:
    assert wire.decode_info(msg.encode()) == msg


DECODERS = [
    ServerGreeting.decode,
    ClientFlags.decode,
    OptionRequest.decode,
    OptionReply.decode,
    ExportNameReply.decode,
    Request.decode,
    SimpleReply.decode,
    wire.StructuredChunk.decode,
]
EXACT_DECODERS = [InfoRequest.decode, ServerEntry.decode, wire.decode_info]


@given(st.binary(max_size=200))
def test_any_bytes_give_a_message_or_malformed(raw: bytes) -> None:
    for decode in DECODERS:
        try:
            result = decode(raw)
        except MalformedMessage:
            continue
        if result is not None:
            msg, used = result
            assert used <= len(raw)
            if decode is not ExportNameReply.decode:  # its 124 reserved bytes are not checked
                assert msg.encode() == raw[:used]
    for decode in EXACT_DECODERS:
        try:
            decode(raw)
        except MalformedMessage:
            pass
