"""The NBD server connection as a pure state machine (no sockets, no clock, no asyncio).

Bytes go in with :meth:`ServerSession.receive_data`; out come events: bytes to send
(greeting, option replies, error replies), queries the adapter answers
(:class:`OpenExport` -> :meth:`ServerSession.export_resolved`, :class:`ListExports` ->
:meth:`ServerSession.exports_listed`), validated transmission commands (``wire.Request``
for READ/FLUSH/TRIM/WRITE_ZEROES, :class:`WriteCommand` for WRITE) and
:class:`CloseConnection`.

Every transmission request is checked before any I/O, as nbdkit does (spec "Error
values"): unknown command or flag -> EINVAL; write/write-zeroes past the end -> ENOSPC,
other requests past the end -> EINVAL; write/trim/write-zeroes on a read-only export ->
EPERM; READ or WRITE longer than ``max_request_bytes`` -> EINVAL (the maximum is
advertised with ``NBD_INFO_BLOCK_SIZE``; the spec leaves the errno open and reserves
EOVERFLOW for the structured-reply DF flag, which never applies here: a READ is always
answered with one chunk).  A rejected WRITE's payload is read and discarded, so the
connection stays usable.  A bad request magic, bad client flags or an option longer than
``max_option_bytes`` close the connection (the stream cannot be re-synchronised).

Structured replies are negotiated on request (``NBD_OPT_STRUCTURED_REPLY``): then a READ
is answered with one ``OFFSET_DATA`` chunk (the adapter, ``structured``) or one ``ERROR``
chunk (here), the export advertises ``NBD_FLAG_SEND_DF`` and READ accepts the DF flag;
other commands keep simple replies, as the spec allows.  No metadata contexts are offered
(``NBD_OPT_SET_META_CONTEXT`` -> ``NBD_REP_ERR_UNSUP``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence, Union

from pvsfarm.errors import LocalProtocolError, MalformedMessage
from pvsfarm.streaming.nbd import wire
from pvsfarm.streaming.nbd.wire import (
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    InfoType,
    Opt,
    Rep,
    Request,
    TransmissionFlag,
    encode_read_error,
    encode_simple_reply,
)

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20  # nbdkit's MAX_REQUEST_SIZE is 64 MiB; qemu-nbd's 32 MiB
DEFAULT_MAX_OPTION_BYTES = 64 * 2**10  # longest legal option is a GO: 4+4096+2+2*n
DEFAULT_MAX_OPTIONS = 256  # a client needs < 10; more is a denial of service (spec allows close)
PREFERRED_BLOCK_BYTES = 4096
SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
_KNOWN_CLIENT_FLAGS = int(wire.ClientFlag.FIXED_NEWSTYLE | wire.ClientFlag.NO_ZEROES)  # int: ~IntFlag drops unknown bits
_COMPACT_BYTES = 1 << 16
# plain ints on the per-request path: IntEnum/IntFlag operators cost ~1 us each (profiled)
_READ, _WRITE, _FLUSH, _TRIM, _ZERO = (int(c) for c in (Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES))
_DISC = int(Cmd.DISC)
_FUA, _NO_HOLE, _DF = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF)
_ALLOWED_FLAGS = {_READ: _FUA, _WRITE: _FUA, _FLUSH: _FUA, _TRIM: _FUA, _ZERO: _FUA | _NO_HOLE}
_EINVAL, _EPERM, _ENOSPC = int(Errno.EINVAL), int(Errno.EPERM), int(Errno.ENOSPC)


class State(enum.Enum):
    CLIENT_FLAGS = "client_flags"
    OPTIONS = "options"
    WAIT_EXPORT = "wait_export"
    WAIT_LIST = "wait_list"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the session needs to know about an opened export."""

    name: str
    size_bytes: int
    read_only: bool
    can_multi_conn: bool
    description: str = ""


@dataclass(frozen=True, slots=True)
class SendData:
    """Bytes the adapter must write, in order with other output."""

    data: bytes


@dataclass(frozen=True, slots=True)
class OpenExport:
    """Open ``name`` and answer with ``export_resolved``; ``option`` is EXPORT_NAME, GO
    (keep it open for transmission) or INFO (only its size is needed: close it after)."""

    name: str
    option: Opt


@dataclass(frozen=True, slots=True)
class ListExports:
    """List export names and answer with ``exports_listed``."""


@dataclass(frozen=True, slots=True)
class WriteCommand:
    """A validated NBD_CMD_WRITE with its payload."""

    request: Request
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close after writing what was queued.  ``protocol_error`` marks peer misbehaviour
    (the adapter logs it); False for NBD_CMD_DISC / NBD_OPT_ABORT / unknown export."""

    reason: str
    protocol_error: bool


Event = Union[SendData, OpenExport, ListExports, Request, WriteCommand, CloseConnection]


def transmission_flags(info: ExportInfo, structured: bool = False) -> int:
    """Transmission flags advertised for ``info`` (spec "Transmission flags"); DF only
    once structured replies are negotiated, as the spec requires."""
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if info.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
        flags |= TransmissionFlag.SEND_WRITE_ZEROES
    if info.can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


class ServerSession:
    """One NBD server connection, fixed newstyle, simple or structured replies."""

    def __init__(
        self,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_option_bytes: int = DEFAULT_MAX_OPTION_BYTES,
        max_options: int = DEFAULT_MAX_OPTIONS,
    ) -> None:
        if max_request_bytes < PREFERRED_BLOCK_BYTES:
            raise ValueError("max_request_bytes must be >= 4096")
        self.max_request_bytes = max_request_bytes
        self.max_option_bytes = max_option_bytes
        self.max_options = max_options
        self.state = State.CLIENT_FLAGS
        self.export: ExportInfo | None = None
        self._buf = bytearray()
        self._pos = 0
        self._fixed = True
        self._no_zeroes = False
        self._options = 0
        self._pending: wire.OptionRequest | None = None
        self._info_request: wire.InfoRequest | None = None
        self._write_req: Request | None = None
        self._discard = 0
        self._discard_reply = b""
        self.structured = False
        """Structured replies negotiated: the adapter answers READs with chunks."""
        self._read_flags = _FUA

    # --- API ----------------------------------------------------------------------

    def initiate(self) -> list[Event]:
        """The server speaks first: the newstyle greeting."""
        return [SendData(wire.ServerGreeting(SERVER_HANDSHAKE_FLAGS).encode())]

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self._buf += data
        return self._process([])

    def export_resolved(self, info: ExportInfo | None) -> list[Event]:
        """Answer to :class:`OpenExport`; ``None`` means unknown or refused."""
        if self.state is not State.WAIT_EXPORT or self._pending is None:
            raise LocalProtocolError("export_resolved() without a pending OpenExport")
        option, self._pending = self._pending.option, None
        out: list[Event] = []
        if option == Opt.EXPORT_NAME:
            self._finish_export_name(info, out)
        else:
            self._finish_info_go(option, info, out)
        return self._process(out)

    def exports_listed(self, names: Sequence[str]) -> list[Event]:
        """Answer to :class:`ListExports`."""
        if self.state is not State.WAIT_LIST:
            raise LocalProtocolError("exports_listed() without a pending ListExports")
        out: list[Event] = []
        for name in names:
            self._reply(out, Opt.LIST, Rep.SERVER, wire.ServerEntry(name).encode())
        self._reply(out, Opt.LIST, Rep.ACK)
        self.state = State.OPTIONS
        return self._process(out)

    def resume_transmission(self, info: ExportInfo, structured: bool = False) -> None:
        """Start in the transmission phase of ``info``: another process ran the
        handshake (which negotiated ``structured`` replies or not) and handed the
        connection over (``nbd.handoff``)."""
        if self.state is not State.CLIENT_FLAGS or self._buf:
            raise LocalProtocolError("resume_transmission() on a session already started")
        self._set_structured(structured)
        self._enter_transmission(info)

    def lone_read(self, data: bytes) -> tuple[int, int, int] | None:
        """Fast path for queue depth 1: when ``data`` is exactly one plain READ within
        the export and nothing else is pending, ``(handle, offset, length)`` -- what
        ``receive_data(data)`` would return as its only event, without building it.
        None otherwise: then call ``receive_data(data)`` (nothing was consumed)."""
        if (len(data) != 28 or self.state is not State.TRANSMISSION or self._pos != len(self._buf)
                or self._discard or self._write_req is not None):
            return None
        magic, flags, typ, handle, offset, length = REQUEST.unpack(data)
        if (magic != REQUEST_MAGIC or typ != _READ or flags & ~self._read_flags or length > self.max_request_bytes
                or self.export is None or offset + length > self.export.size_bytes):
            return None
        return handle, offset, length

    def unparsed(self) -> bytes | None:
        """Received bytes not yet turned into events, or None when the session is in
        the middle of a WRITE payload (then it cannot be handed to another process)."""
        if self._write_req is not None or self._discard:
            return None
        return bytes(self._buf[self._pos :])

    # --- input loop ---------------------------------------------------------------

    def _process(self, out: list[Event]) -> list[Event]:
        while True:
            state = self.state
            if state is State.TRANSMISSION:
                self._run_transmission(out)
                break
            if state is State.CLIENT_FLAGS:
                progressed = self._run_client_flags(out)
            elif state is State.OPTIONS:
                progressed = self._run_option(out)
            else:
                break
            if not progressed:
                break
        self._compact()
        return out

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > _COMPACT_BYTES:
            del self._buf[: self._pos]
            self._pos = 0

    def _close(self, out: list[Event], reason: str, protocol_error: bool = True) -> None:
        out.append(CloseConnection(reason, protocol_error))
        self.state = State.CLOSED
        self._buf.clear()
        self._pos = 0

    def _reply(self, out: list[Event], option: int, rep: int, data: bytes = b"") -> None:
        out.append(SendData(wire.OptionReply(option, rep, data).encode()))

    def _error(self, out: list[Event], option: int, rep: Rep, message: str) -> None:
        self._reply(out, option, rep, message.encode())

    # --- handshake ----------------------------------------------------------------

    def _run_client_flags(self, out: list[Event]) -> bool:
        decoded = wire.ClientFlags.decode(self._buf[self._pos :])
        if decoded is None:
            return False
        flags, used = decoded
        self._pos += used
        if flags.flags & ~_KNOWN_CLIENT_FLAGS:
            self._close(out, f"unknown client flags 0x{flags.flags:x}")
            return False
        self._fixed = bool(flags.flags & wire.ClientFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags.flags & wire.ClientFlag.NO_ZEROES)
        self.state = State.OPTIONS
        return True

    def _run_option(self, out: list[Event]) -> bool:
        try:
            decoded = wire.OptionRequest.decode(self._buf[self._pos :], self.max_option_bytes)
        except MalformedMessage as exc:
            self._close(out, str(exc))
            return False
        if decoded is None:
            return False
        opt, used = decoded
        self._pos += used
        self._options += 1
        if self._options > self.max_options:
            self._close(out, f"more than {self.max_options} options")
            return False
        if not self._fixed and opt.option != Opt.EXPORT_NAME:
            self._close(out, "non-fixed-newstyle client sent an option other than EXPORT_NAME")
            return False
        self._handle_option(opt, out)
        return True

    def _handle_option(self, opt: wire.OptionRequest, out: list[Event]) -> None:
        o = opt.option
        if o == Opt.EXPORT_NAME:
            try:
                name = wire.decode_string(opt.data)
            except MalformedMessage as exc:  # EXPORT_NAME cannot be errored: hard disconnect
                self._close(out, f"EXPORT_NAME: {exc}")
                return
            self._wait_export(opt, None, name, out)
        elif o == Opt.ABORT:
            self._reply(out, o, Rep.ACK)
            self._close(out, "client aborted negotiation", protocol_error=False)
        elif o == Opt.LIST:
            if opt.data:
                self._error(out, o, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
            else:
                out.append(ListExports())
                self.state = State.WAIT_LIST
        elif o in (Opt.INFO, Opt.GO):
            self._start_info_go(opt, out)
        elif o == Opt.STARTTLS:
            self._error(out, o, Rep.ERR_POLICY, "TLS is not configured on this server")
        elif o == Opt.STRUCTURED_REPLY:
            if opt.data:
                self._error(out, o, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self._set_structured(True)
                self._reply(out, o, Rep.ACK)
        elif o in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT) and not self.structured:
            # spec: only after structured replies are negotiated, else ERR_INVALID
            self._error(out, o, Rep.ERR_INVALID, "structured replies not negotiated")
        else:  # includes the meta contexts (none offered) and EXTENDED_HEADERS
            self._error(out, o, Rep.ERR_UNSUP, "option not supported")

    def _set_structured(self, structured: bool) -> None:
        self.structured = structured
        self._read_flags = _FUA | _DF if structured else _FUA

    def _start_info_go(self, opt: wire.OptionRequest, out: list[Event]) -> None:
        try:
            request = wire.InfoRequest.decode(opt.data)
        except MalformedMessage as exc:
            self._error(out, opt.option, Rep.ERR_INVALID, str(exc))
            return
        self._wait_export(opt, request, request.name, out)

    def _wait_export(self, opt, request, name: str, out: list[Event]) -> None:
        self._pending, self._info_request = opt, request
        self.state = State.WAIT_EXPORT
        out.append(OpenExport(name, Opt(opt.option)))

    def _finish_export_name(self, info: ExportInfo | None, out: list[Event]) -> None:
        if info is None:  # spec: EXPORT_NAME cannot be refused except by closing
            self._close(out, "unknown export", protocol_error=False)
            return
        flags = transmission_flags(info, self.structured)
        reply = wire.ExportNameReply(info.size_bytes, flags, zeroes=not self._no_zeroes)
        out.append(SendData(reply.encode()))
        self._enter_transmission(info)

    def _finish_info_go(self, option: int, info: ExportInfo | None, out: list[Event]) -> None:
        request, self._info_request = self._info_request, None
        self.state = State.OPTIONS
        if info is None or request is None:
            self._error(out, option, Rep.ERR_UNKNOWN, "export not available")
            return
        items: list[wire.InfoItem] = [wire.InfoExport(info.size_bytes, transmission_flags(info, self.structured))]
        if InfoType.NAME in request.info_types:
            items.append(wire.InfoName(info.name))
        if InfoType.DESCRIPTION in request.info_types and info.description:
            items.append(wire.InfoDescription(info.description))
        items.append(wire.InfoBlockSize(1, PREFERRED_BLOCK_BYTES, self.max_request_bytes))
        for item in items:
            self._reply(out, option, Rep.INFO, item.encode())
        self._reply(out, option, Rep.ACK)
        if option == Opt.GO:
            self._enter_transmission(info)

    def _enter_transmission(self, info: ExportInfo) -> None:
        self.export = info
        self.state = State.TRANSMISSION

    # --- transmission -------------------------------------------------------------

    def _validate(self, req: Request) -> int:
        """Errno for a request header, 0 when it may be executed (spec "Error values")."""
        export = self.export
        if export is None:  # unreachable: TRANSMISSION is entered with an export
            return _EINVAL
        typ, flags = req.type, req.flags
        if typ == _READ and not flags & ~self._read_flags:  # hot path first: a plain READ
            if req.length > self.max_request_bytes:
                return _EINVAL
            return _EINVAL if req.offset + req.length > export.size_bytes else 0
        allowed = _ALLOWED_FLAGS.get(typ)
        if allowed is None or flags & ~allowed:
            return _EINVAL
        if typ == _WRITE and req.length > self.max_request_bytes:
            return _EINVAL
        if typ == _FLUSH:
            return _EINVAL if (req.offset or req.length) else 0
        if export.read_only:
            return _EPERM
        if req.offset + req.length > export.size_bytes:
            return _ENOSPC if typ in (_WRITE, _ZERO) else _EINVAL
        return 0

    def _run_transmission(self, out: list[Event]) -> None:
        buf, pos, end = self._buf, self._pos, len(self._buf)
        unpack = REQUEST.unpack_from
        max_read, read_flags = self.max_request_bytes, self._read_flags
        size = self.export.size_bytes if self.export is not None else 0
        while True:
            if self._discard or self._write_req is not None:
                pos = self._take_payload(out, pos, end)
                if self._discard or self._write_req is not None:
                    break
            if end - pos < 28:
                break
            magic, flags, typ, handle, offset, length = unpack(buf, pos)
            if magic != REQUEST_MAGIC:
                self._close(out, f"bad request magic 0x{magic:08x}")
                return
            pos += 28
            if typ == _DISC:
                self._close(out, "client sent NBD_CMD_DISC", protocol_error=False)
                return
            req = Request(flags, typ, handle, offset, length)
            if typ == _READ and not flags & ~read_flags and length <= max_read and offset + length <= size:
                out.append(req)  # the hot path, inlined from _validate (profiled: ~8% per READ)
                continue
            err = self._validate(req)
            if typ == _WRITE:
                if err:  # the payload must still be read past; reply once it is
                    self._discard, self._discard_reply = length, encode_simple_reply(err, handle)
                    if not length:
                        out.append(SendData(self._discard_reply))
                else:
                    self._write_req = req
            elif err:
                out.append(SendData(encode_read_error(err, handle, self.structured) if typ == _READ
                                    else encode_simple_reply(err, handle)))
            else:
                out.append(req)
        self._pos = pos

    def _take_payload(self, out: list[Event], pos: int, end: int) -> int:
        """Consume a WRITE payload (or a rejected one) from ``pos``; new position."""
        if self._discard:
            n = min(self._discard, end - pos)
            self._discard -= n
            if not self._discard:
                out.append(SendData(self._discard_reply))
            return pos + n
        assert self._write_req is not None  # caller checked
        need = self._write_req.length
        if end - pos < need:
            return pos
        with memoryview(self._buf) as view:
            data = bytes(view[pos : pos + need])
        out.append(WriteCommand(self._write_req, data))
        self._write_req = None
        return pos + need
