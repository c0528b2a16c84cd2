"""The pure NBD session, driven with bytes only (no sockets, no event loop)."""

from __future__ import annotations

import pytest

from pvsfarm.errors import LocalProtocolError
from pvsfarm.streaming.nbd import wire
from pvsfarm.streaming.nbd.session import (
    CloseConnection,
    ExportInfo,
    ListExports,
    OpenExport,
    SendData,
    ServerSession,
    State,
    WriteCommand,
    transmission_flags,
)
from pvsfarm.streaming.nbd.wire import Cmd, ClientFlag, Errno, InfoType, Opt, Rep, Request, TransmissionFlag as TF

SIZE = 1 << 20
RO = ExportInfo("ro", SIZE, read_only=True, can_multi_conn=True, description="base")
RW = ExportInfo("rw", SIZE, read_only=False, can_multi_conn=False)
FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


def sent(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, SendData))


def option_replies(events) -> list[wire.OptionReply]:
    raw, out = sent(events), []
    while raw:
        rep, used = wire.OptionReply.decode(raw)
        out.append(rep)
        raw = raw[used:]
    return out


def simple_replies(events) -> list[wire.SimpleReply]:
    raw = sent(events)
    return [wire.SimpleReply.decode(raw[i : i + 16])[0] for i in range(0, len(raw), 16)]


def go(name: str = "ro", types: tuple[int, ...] = ()) -> bytes:
    return wire.OptionRequest(Opt.GO, wire.InfoRequest(name, types).encode()).encode()


def req(typ: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7) -> bytes:
    return Request(flags, typ, handle, offset, length).encode()


def connected(info: ExportInfo = RO, **kw) -> ServerSession:
    """A session in transmission phase on ``info``."""
    s = ServerSession(**kw)
    s.initiate()
    events = s.receive_data(wire.ClientFlags(FLAGS).encode() + go(info.name))
    assert events == [OpenExport(info.name, Opt.GO)]
    replies = option_replies(s.export_resolved(info))
    assert replies[-1] == wire.OptionReply(Opt.GO, Rep.ACK)
    assert s.state is State.TRANSMISSION
    return s


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    (event,) = ServerSession().initiate()
    greeting, _ = wire.ServerGreeting.decode(event.data)
    assert greeting.handshake_flags == wire.HandshakeFlag.FIXED_NEWSTYLE | wire.HandshakeFlag.NO_ZEROES


def test_go_replies_info_export_block_size_name_description_then_ack() -> None:
    s = ServerSession(max_request_bytes=1 << 20)
    s.receive_data(wire.ClientFlags(FLAGS).encode())
    assert s.receive_data(go("ro", (InfoType.NAME, InfoType.DESCRIPTION))) == [OpenExport("ro", Opt.GO)]
    replies = option_replies(s.export_resolved(RO))
    assert [r.reply_type for r in replies] == [Rep.INFO] * 4 + [Rep.ACK]
    infos = [wire.decode_info(r.data) for r in replies[:-1]]
    assert infos == [
        wire.InfoExport(SIZE, TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.CAN_MULTI_CONN),
        wire.InfoName("ro"),
        wire.InfoDescription("base"),
        wire.InfoBlockSize(1, 4096, 1 << 20),
    ]
    assert s.state is State.TRANSMISSION


def test_info_answers_but_stays_in_negotiation() -> None:
    s = ServerSession()
    s.receive_data(wire.ClientFlags(FLAGS).encode())
    info = wire.OptionRequest(Opt.INFO, wire.InfoRequest("rw").encode()).encode()
    assert s.receive_data(info) == [OpenExport("rw", Opt.INFO)]
    replies = option_replies(s.export_resolved(RW))
    assert replies[0].reply_type == Rep.INFO and replies[-1].reply_type == Rep.ACK
    assert s.state is State.OPTIONS


def test_unknown_export_on_go_is_err_unknown_and_negotiation_continues() -> None:
    s = ServerSession()
    s.receive_data(wire.ClientFlags(FLAGS).encode())
    s.receive_data(go("secret"))
    (rep,) = option_replies(s.export_resolved(None))
    assert rep.reply_type == Rep.ERR_UNKNOWN and b"secret" not in rep.data
    assert s.receive_data(go("ro")) == [OpenExport("ro", Opt.GO)]


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_honours_no_zeroes(no_zeroes: bool) -> None:
    s = ServerSession()
    flags = FLAGS if no_zeroes else ClientFlag.FIXED_NEWSTYLE
    s.receive_data(wire.ClientFlags(flags).encode())
    assert s.receive_data(wire.OptionRequest(Opt.EXPORT_NAME, b"rw").encode()) == [
        OpenExport("rw", Opt.EXPORT_NAME)
    ]
    raw = sent(s.export_resolved(RW))
    assert len(raw) == (10 if no_zeroes else 134)
    reply, _ = wire.ExportNameReply.decode(raw, zeroes=not no_zeroes)
    assert reply.size == SIZE and reply.transmission_flags == transmission_flags(RW)
    assert s.state is State.TRANSMISSION


def test_export_name_unknown_closes_without_protocol_error() -> None:
    s = ServerSession()
    s.receive_data(wire.ClientFlags(FLAGS).encode() + wire.OptionRequest(Opt.EXPORT_NAME, b"x").encode())
    assert s.export_resolved(None) == [CloseConnection("unknown export", False)]
    assert s.state is State.CLOSED


@pytest.mark.parametrize(
    ("option", "data", "rep"),
    [
        (99, b"", Rep.ERR_UNSUP),
        (Opt.STRUCTURED_REPLY, b"x", Rep.ERR_INVALID),
        (Opt.EXTENDED_HEADERS, b"", Rep.ERR_UNSUP),
        (Opt.STARTTLS, b"", Rep.ERR_POLICY),
        (Opt.LIST, b"x", Rep.ERR_INVALID),
        (Opt.SET_META_CONTEXT, b"", Rep.ERR_INVALID),
        (Opt.GO, b"\0\0\0\x09\0\0", Rep.ERR_INVALID),
    ],
)
def test_option_errors_keep_the_connection(option: int, data: bytes, rep: Rep) -> None:
    s = ServerSession()
    s.receive_data(wire.ClientFlags(FLAGS).encode())
    (reply,) = option_replies(s.receive_data(wire.OptionRequest(option, data).encode()))
    assert (reply.option, reply.reply_type) == (option, rep)
    assert s.state is State.OPTIONS


def test_list_then_abort() -> None:
    s = ServerSession()
    s.receive_data(wire.ClientFlags(FLAGS).encode())
    assert s.receive_data(wire.OptionRequest(Opt.LIST).encode()) == [ListExports()]
    replies = option_replies(s.exports_listed(["a", "b"]))
    assert [wire.ServerEntry.decode(r.data).name for r in replies[:2]] == ["a", "b"]
    assert replies[2] == wire.OptionReply(Opt.LIST, Rep.ACK)
    events = s.receive_data(wire.OptionRequest(Opt.ABORT).encode())
    assert option_replies(events[:1]) == [wire.OptionReply(Opt.ABORT, Rep.ACK)]
    assert events[1] == CloseConnection("client aborted negotiation", False)


@pytest.mark.parametrize(
    "stream",
    [
        b"\0\0\0\x04",  # unknown client flag
        wire.ClientFlags(FLAGS).encode() + b"GARBAGE!" + bytes(8),  # bad option magic
        wire.ClientFlags(FLAGS).encode() + wire._OPT_HDR.pack(wire.IHAVEOPT, Opt.GO, 65537),  # too long
        wire.ClientFlags(FLAGS).encode() + wire.OptionRequest(Opt.EXPORT_NAME, b"\xff").encode(),
        wire.ClientFlags(0).encode() + wire.OptionRequest(Opt.LIST).encode(),  # non-fixed newstyle
    ],
)
def test_handshake_violations_close(stream: bytes) -> None:
    s = ServerSession()
    events = s.receive_data(stream)
    assert isinstance(events[-1], CloseConnection) and events[-1].protocol_error
    assert s.state is State.CLOSED
    assert s.receive_data(b"more") == []


def test_too_many_options_close() -> None:
    s = ServerSession(max_options=3)
    s.receive_data(wire.ClientFlags(FLAGS).encode())
    events = s.receive_data(wire.OptionRequest(99).encode() * 4)
    assert len(option_replies(events[:3])) == 3
    assert isinstance(events[3], CloseConnection)


def test_answering_without_a_query_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ServerSession().export_resolved(RO)
    with pytest.raises(LocalProtocolError):
        ServerSession().exports_listed([])


# --- transmission ---------------------------------------------------------------------

CLIENT_STREAM = (
    req(Cmd.READ, 0, 4096, handle=1)
    + req(Cmd.WRITE, 512, 3, handle=2)
    + b"abc"
    + req(Cmd.FLUSH, handle=3)
    + req(Cmd.WRITE_ZEROES, 0, 512, flags=wire.CmdFlag.NO_HOLE, handle=4)
    + req(Cmd.TRIM, 4096, 4096, flags=wire.CmdFlag.FUA, handle=5)
)
EXPECTED = [
    Request(0, Cmd.READ, 1, 0, 4096),
    WriteCommand(Request(0, Cmd.WRITE, 2, 512, 3), b"abc"),
    Request(0, Cmd.FLUSH, 3, 0, 0),
    Request(wire.CmdFlag.NO_HOLE, Cmd.WRITE_ZEROES, 4, 0, 512),
    Request(wire.CmdFlag.FUA, Cmd.TRIM, 5, 4096, 4096),
]


def test_stream_fed_whole() -> None:
    assert connected(RW).receive_data(CLIENT_STREAM) == EXPECTED


def test_stream_fed_byte_by_byte() -> None:
    s, events = connected(RW), []
    for i in range(len(CLIENT_STREAM)):
        events += s.receive_data(CLIENT_STREAM[i : i + 1])
    assert events == EXPECTED


def test_stream_with_trailing_partial_request() -> None:
    s = connected(RW)
    tail = req(Cmd.READ, 8192, 512, handle=9)
    assert s.receive_data(CLIENT_STREAM + tail[:27]) == EXPECTED
    assert s.receive_data(tail[27:]) == [Request(0, Cmd.READ, 9, 8192, 512)]


def test_handshake_and_requests_in_one_chunk() -> None:
    s = ServerSession()
    assert s.receive_data(wire.ClientFlags(FLAGS).encode() + go("rw") + CLIENT_STREAM) == [OpenExport("rw", Opt.GO)]
    events = s.export_resolved(RW)
    assert [e for e in events if not isinstance(e, SendData)] == EXPECTED


@pytest.mark.parametrize(
    ("info", "request_bytes", "errno"),
    [
        (RO, req(Cmd.READ, SIZE - 4096, 4097), Errno.EINVAL),  # past the end
        (RO, req(Cmd.READ, 2**64 - 1, 1), Errno.EINVAL),
        (RO, req(Cmd.READ, 0, (32 << 20) + 1), Errno.EINVAL),  # over max_request_bytes
        (RO, req(Cmd.WRITE, 0, 0), Errno.EPERM),  # read-only
        (RO, req(Cmd.TRIM, 0, 512), Errno.EPERM),
        (RO, req(Cmd.WRITE_ZEROES, 0, 512), Errno.EPERM),
        (RW, req(Cmd.WRITE_ZEROES, SIZE, 1), Errno.ENOSPC),
        (RW, req(Cmd.TRIM, SIZE, 1), Errno.EINVAL),
        (RW, req(Cmd.FLUSH, 0, 1), Errno.EINVAL),  # FLUSH offset/length must be zero
        (RW, req(Cmd.CACHE, 0, 512), Errno.EINVAL),  # not advertised
        (RW, req(Cmd.BLOCK_STATUS, 0, 512), Errno.EINVAL),
        (RW, req(99, 0, 512), Errno.EINVAL),  # unknown command
        (RW, req(Cmd.READ, 0, 512, flags=wire.CmdFlag.NO_HOLE), Errno.EINVAL),  # flag not for READ
        (RW, req(Cmd.READ, 0, 512, flags=wire.CmdFlag.DF), Errno.EINVAL),  # DF not negotiated
        (RW, req(Cmd.READ, 0, 512, flags=1 << 15), Errno.EINVAL),  # unknown flag
    ],
)
def test_invalid_requests_get_errors_before_any_io(info, request_bytes: bytes, errno: int) -> None:
    s = connected(info)
    events = s.receive_data(request_bytes + req(Cmd.READ, 0, 512, handle=8))
    assert simple_replies(events[:1]) == [wire.SimpleReply(errno, 7)]
    assert events[1:] == [Request(0, Cmd.READ, 8, 0, 512)]  # and the connection goes on


@pytest.mark.parametrize(
    ("info", "offset", "length", "errno"),
    [
        (RW, SIZE - 2, 3, Errno.ENOSPC),  # write past the end
        (RO, 0, 100, Errno.EPERM),  # write to a read-only export
        (RW, 0, (32 << 20) + 1, Errno.EINVAL),  # write over max_request_bytes
    ],
)
def test_rejected_write_payload_is_discarded(info, offset: int, length: int, errno: int) -> None:
    s = connected(info)
    events = s.receive_data(req(Cmd.WRITE, offset, length))
    assert events == []  # the reply waits until the payload has been skipped
    chunk = bytes(1 << 16)
    for _ in range(length // len(chunk)):
        assert s.receive_data(chunk) == []
    events = s.receive_data(bytes(length % len(chunk)) + req(Cmd.READ, 0, 8, handle=8))
    assert simple_replies(events[:1]) == [wire.SimpleReply(errno, 7)]
    assert events[1:] == [Request(0, Cmd.READ, 8, 0, 8)]


def test_custom_max_request_bytes() -> None:
    s = connected(RO, max_request_bytes=8192)
    events = s.receive_data(req(Cmd.READ, 0, 8192, handle=1) + req(Cmd.READ, 0, 8193, handle=2))
    assert events[0] == Request(0, Cmd.READ, 1, 0, 8192)
    assert simple_replies(events[1:]) == [wire.SimpleReply(Errno.EINVAL, 2)]


def test_bad_request_magic_closes() -> None:
    s = connected(RO)
    events = s.receive_data(req(Cmd.READ, 0, 512, handle=1) + b"\xde\xad\xbe\xef" + bytes(24))
    assert events[0] == Request(0, Cmd.READ, 1, 0, 512)
    assert isinstance(events[1], CloseConnection) and events[1].protocol_error
    assert s.state is State.CLOSED


def test_disc_closes_cleanly_and_ignores_the_rest() -> None:
    s = connected(RO)
    events = s.receive_data(req(Cmd.READ, 0, 512, handle=1) + req(Cmd.DISC) + req(Cmd.READ, 0, 512))
    assert events == [Request(0, Cmd.READ, 1, 0, 512), CloseConnection("client sent NBD_CMD_DISC", False)]


def test_transmission_flags_per_export_kind() -> None:
    assert transmission_flags(RO) == TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.CAN_MULTI_CONN
    assert transmission_flags(RW) == (
        TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
    )
    assert transmission_flags(RO, structured=True) == transmission_flags(RO) | TF.SEND_DF


def _structured_on(info: ExportInfo = RW) -> tuple[ServerSession, list[wire.OptionReply]]:
    s = ServerSession()
    s.initiate()
    s.receive_data(wire.ClientFlags(FLAGS).encode())
    (ack,) = option_replies(s.receive_data(wire.OptionRequest(Opt.STRUCTURED_REPLY).encode()))
    assert ack == wire.OptionReply(Opt.STRUCTURED_REPLY, Rep.ACK) and s.structured
    (meta,) = option_replies(s.receive_data(wire.OptionRequest(Opt.SET_META_CONTEXT).encode()))
    assert meta.reply_type == Rep.ERR_UNSUP  # negotiated now, but no contexts are offered
    assert s.receive_data(go(info.name)) == [OpenExport(info.name, Opt.GO)]
    return s, option_replies(s.export_resolved(info))


def test_structured_replies_negotiated_advertise_df_and_fail_reads_with_error_chunks() -> None:
    s, replies = _structured_on(RW)
    assert wire.decode_info(replies[0].data) == wire.InfoExport(SIZE, transmission_flags(RW, structured=True))
    df = int(wire.CmdFlag.DF)
    events = s.receive_data(req(Cmd.READ, 0, 512, flags=df, handle=1) + req(Cmd.READ, SIZE, 512, handle=2)
                            + req(Cmd.WRITE, SIZE, 1, handle=3) + b"x" + req(Cmd.READ, 0, 512, flags=1 << 9, handle=4))
    assert events[0] == Request(df, Cmd.READ, 1, 0, 512)  # DF: we never split a READ, so it always holds
    raw = sent(events[1:])
    chunk, used = wire.StructuredChunk.decode(raw)
    assert (chunk.flags, chunk.type, chunk.handle, chunk.error()) == (
        wire.ReplyFlag.DONE, wire.ReplyType.ERROR, 2, (Errno.EINVAL, ""))
    simple, n = wire.SimpleReply.decode(raw[used:])  # other commands keep simple replies
    assert (simple.error, simple.handle) == (Errno.ENOSPC, 3)
    chunk, rest = wire.StructuredChunk.decode(raw[used + n :])
    assert (chunk.type, chunk.handle, chunk.error()[0]) == (wire.ReplyType.ERROR, 4, Errno.EINVAL)
    assert used + n + rest == len(raw)


def test_without_structured_replies_df_is_an_invalid_flag() -> None:
    s = connected(RO)
    (reply,) = simple_replies(s.receive_data(req(Cmd.READ, 0, 512, flags=int(wire.CmdFlag.DF))))
    assert (reply.error, reply.handle) == (Errno.EINVAL, 7)
    assert not s.structured


# --- lone_read: the queue-depth-1 fast path must agree with receive_data ---------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pvsfarm.streaming.nbd.session import ExportInfo as _ExportInfo  # noqa: E402

_SIZE = 1 << 20


def _transmitting(read_only: bool = True, structured: bool = False) -> ServerSession:
    s = ServerSession(max_request_bytes=1 << 16)
    s.resume_transmission(_ExportInfo("x", _SIZE, read_only, True), structured)
    return s


_requests = st.builds(
    lambda magic_ok, flags, typ, handle, offset, length: (
        wire.REQUEST.pack(wire.REQUEST_MAGIC if magic_ok else 0x12345678, flags, typ, handle, offset, length)),
    st.booleans(), st.sampled_from([0, int(wire.CmdFlag.FUA), 2, int(wire.CmdFlag.DF), 5, 0xFFFF]),
    st.sampled_from([0, 1, 2, 3, 4, 6, 99]),
    st.integers(0, 2**64 - 1), st.sampled_from([0, 4096, _SIZE - 4096, _SIZE, 2**63]),
    st.sampled_from([0, 1, 4096, 1 << 16, (1 << 16) + 1, 2**32 - 1]),
)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(_requests, st.binary(max_size=40)), prefix=st.binary(max_size=30), structured=st.booleans())
def test_lone_read_agrees_with_receive_data(data: bytes, prefix: bytes, structured: bool) -> None:
    fast, slow = _transmitting(structured=structured), _transmitting(structured=structured)
    if prefix:  # unparsed bytes already held: the fast path must step aside
        fast.receive_data(prefix)
        slow.receive_data(prefix)
    lone = fast.lone_read(data)
    events = slow.receive_data(data)
    if lone is None:
        assert fast.receive_data(data) == events  # nothing was consumed
        return
    (ev,) = events
    assert isinstance(ev, Request) and ev.type == Cmd.READ
    assert (ev.handle, ev.offset, ev.length) == lone
    assert fast.receive_data(b"") == slow.receive_data(b"")  # same state afterwards


def test_lone_read_only_for_a_plain_read_in_transmission() -> None:
    s = _transmitting()
    assert s.lone_read(Request(0, int(Cmd.READ), 7, 4096, 512).encode()) == (7, 4096, 512)
    assert s.lone_read(Request(0, int(Cmd.READ), 7, _SIZE - 511, 512).encode()) is None  # past the end
    assert s.lone_read(Request(0, int(Cmd.FLUSH), 7, 0, 0).encode()) is None
    assert s.lone_read(Request(0, int(Cmd.READ), 7, 0, 512).encode() * 2) is None  # two requests
    assert ServerSession().lone_read(Request(0, int(Cmd.READ), 7, 0, 512).encode()) is None  # handshake
