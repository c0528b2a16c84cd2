"""NBD wire codec: bytes <-> frozen dataclasses (fixed newstyle handshake + transmission).

Reference: the NBD protocol, ``doc/proto.md`` of the NetworkBlockDevice/nbd project
(sections "Fixed newstyle negotiation", "Transmission", "Values"), with the INFO
extension (``NBD_OPT_INFO``/``NBD_OPT_GO``) as merged into the normative text.
All integers are big-endian ("network byte order").

Every message class has ``encode() -> bytes`` and ``decode(buf) -> (message, consumed)``
or ``None`` when ``buf`` holds too few bytes yet; ``decode`` raises only
:class:`~pvsfarm.errors.MalformedMessage`.  Payload data (the bytes of a READ reply,
the bytes following a WRITE request) stay out of the codec: a request or reply is its
header only, the adapter moves the data.

Structured replies (spec "Structured reply chunk message"): a server that negotiated
them answers every READ with chunks (`StructuredChunk`; ``encode_read_chunk`` and
``encode_error_chunk`` are the adapter's fast paths) and may keep simple replies for the
other commands, as pvsfarm does.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple, Union

from pvsfarm.errors import MalformedMessage

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", a.k.a. INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513  # NBD_REQUEST_MAGIC
SIMPLE_REPLY_MAGIC = 0x67446698  # NBD_SIMPLE_REPLY_MAGIC
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # NBD_STRUCTURED_REPLY_MAGIC
MAX_STRING_BYTES = 4096  # spec "Conventions": strings MUST be no longer than 4096 bytes
EXPORT_NAME_ZEROES = 124  # reserved zero bytes after an NBD_OPT_EXPORT_NAME reply

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPT_HDR = struct.Struct(">QII")
_REP_HDR = struct.Struct(">QIII")
_EXPORT_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")  # structured reply chunk header: magic, flags, type, handle, length
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # + the offset of an OFFSET_DATA chunk
_ERROR_CHUNK = struct.Struct(">IHHQIIH")  # + error, message length of an ERROR chunk
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK = struct.Struct(">HIII")

Buffer = Union[bytes, bytearray, memoryview]


class HandshakeFlag(enum.IntFlag):
    """Handshake flags (server, 16 bits): ``NBD_FLAG_FIXED_NEWSTYLE``, ``NBD_FLAG_NO_ZEROES``."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (32 bits): ``NBD_FLAG_C_FIXED_NEWSTYLE``, ``NBD_FLAG_C_NO_ZEROES``."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Transmission flags (16 bits), ``NBD_FLAG_*`` in the spec's "Transmission flags"."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    """Option types, ``NBD_OPT_*``."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types, ``NBD_REP_*``; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9
    ERR_EXT_HEADER_REQD = _ERR + 10


class InfoType(enum.IntEnum):
    """Information types carried by ``NBD_REP_INFO``, ``NBD_INFO_*``."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """Request types, ``NBD_CMD_*``."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    """Command flags (16 bits), ``NBD_CMD_FLAG_*``."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags, ``NBD_REPLY_FLAG_*``."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types, ``NBD_REPLY_TYPE_*``; errors have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(enum.IntEnum):
    """Error values of the reply's error field (spec "Error values")."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


def _need(buf: Buffer, n: int) -> bool:
    return len(buf) >= n


def encode_string(text: str) -> bytes:
    """UTF-8 bytes of an NBD string (no NUL, at most 4096 bytes)."""
    data = text.encode("utf-8")
    if len(data) > MAX_STRING_BYTES or b"\0" in data:
        raise ValueError("NBD strings are at most 4096 bytes without NUL")
    return data


def decode_string(data: Buffer) -> str:
    """Decode an NBD string; raise MalformedMessage unless UTF-8, NUL-free, <= 4096 bytes."""
    raw = bytes(data)
    if len(raw) > MAX_STRING_BYTES or b"\0" in raw:
        raise MalformedMessage("NBD string too long or contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage("NBD string is not UTF-8") from exc


@dataclass(frozen=True, slots=True)
class ServerGreeting:
    """Newstyle greeting, 18 bytes::

        S: 64 bits, 0x4e42444d41474943 ("NBDMAGIC")
        S: 64 bits, 0x49484156454F5054 ("IHAVEOPT")
        S: 16 bits, handshake flags
    """

    handshake_flags: int

    SIZE = _GREETING.size

    def encode(self) -> bytes:
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, self.handshake_flags)

    @classmethod
    def decode(cls, buf: Buffer) -> tuple[ServerGreeting, int] | None:
        if not _need(buf, cls.SIZE):
            return None
        magic, opt, flags = _GREETING.unpack_from(buf)
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise MalformedMessage("not a newstyle NBD greeting")
        return cls(flags), cls.SIZE


@dataclass(frozen=True, slots=True)
class ClientFlags:
    """Client flags, 4 bytes: ``C: 32 bits, client flags``."""

    flags: int

    SIZE = _CLIENT_FLAGS.size

    def encode(self) -> bytes:
        return _CLIENT_FLAGS.pack(self.flags)

    @classmethod
    def decode(cls, buf: Buffer) -> tuple[ClientFlags, int] | None:
        if not _need(buf, cls.SIZE):
            return None
        return cls(_CLIENT_FLAGS.unpack_from(buf)[0]), cls.SIZE


@dataclass(frozen=True, slots=True)
class OptionRequest:
    """Option haggling request, 16 bytes + data::

        C: 64 bits, 0x49484156454F5054 ("IHAVEOPT")
        C: 32 bits, option
        C: 32 bits, length of option data (unsigned)
        C: any data needed for the chosen option, of length as specified above

    ``option`` stays an ``int``: unknown options must still be answered (ERR_UNSUP).
    """

    option: int
    data: bytes = b""

    HEADER_SIZE = _OPT_HDR.size

    def encode(self) -> bytes:
        return _OPT_HDR.pack(IHAVEOPT, self.option, len(self.data)) + self.data

    @classmethod
    def decode(cls, buf: Buffer, max_data: int = 1 << 32) -> tuple[OptionRequest, int] | None:
        """``max_data`` bounds the announced length: a larger one is malformed at once,
        so a peer cannot make us wait for (and buffer) 4 GiB of option data."""
        if not _need(buf, cls.HEADER_SIZE):
            return None
        magic, option, length = _OPT_HDR.unpack_from(buf)
        if magic != IHAVEOPT:
            raise MalformedMessage("option request without IHAVEOPT magic")
        if length > max_data:
            raise MalformedMessage(f"option data length {length} exceeds {max_data}")
        end = cls.HEADER_SIZE + length
        if not _need(buf, end):
            return None
        return cls(option, bytes(buf[cls.HEADER_SIZE:end])), end


@dataclass(frozen=True, slots=True)
class OptionReply:
    """Fixed newstyle option reply, 20 bytes + data::

        S: 64 bits, 0x3e889045565a9 (magic number for replies)
        S: 32 bits, the option as sent by the client to which this is a reply
        S: 32 bits, reply type (NBD_REP_*)
        S: 32 bits, length of the reply
        S: any data as required by the reply
    """

    option: int
    reply_type: int
    data: bytes = b""

    HEADER_SIZE = _REP_HDR.size

    def encode(self) -> bytes:
        hdr = _REP_HDR.pack(OPTION_REPLY_MAGIC, self.option, self.reply_type, len(self.data))
        return hdr + self.data

    @classmethod
    def decode(cls, buf: Buffer, max_data: int = 1 << 32) -> tuple[OptionReply, int] | None:
        if not _need(buf, cls.HEADER_SIZE):
            return None
        magic, option, reply_type, length = _REP_HDR.unpack_from(buf)
        if magic != OPTION_REPLY_MAGIC:
            raise MalformedMessage("option reply without reply magic")
        if length > max_data:
            raise MalformedMessage(f"option reply length {length} exceeds {max_data}")
        end = cls.HEADER_SIZE + length
        if not _need(buf, end):
            return None
        return cls(option, reply_type, bytes(buf[cls.HEADER_SIZE:end])), end


@dataclass(frozen=True, slots=True)
class ExportNameReply:
    """Reply to ``NBD_OPT_EXPORT_NAME`` (no reply header)::

        S: 64 bits, size of the export in bytes (unsigned)
        S: 16 bits, transmission flags
        S: 124 bytes, zeroes (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated)
    """

    size: int
    transmission_flags: int
    zeroes: bool = True

    def encode(self) -> bytes:
        pad = bytes(EXPORT_NAME_ZEROES) if self.zeroes else b""
        return _EXPORT_REPLY.pack(self.size, self.transmission_flags) + pad

    @classmethod
    def decode(cls, buf: Buffer, zeroes: bool = True) -> tuple[ExportNameReply, int] | None:
        end = _EXPORT_REPLY.size + (EXPORT_NAME_ZEROES if zeroes else 0)
        if not _need(buf, end):
            return None
        size, flags = _EXPORT_REPLY.unpack_from(buf)
        return cls(size, flags, zeroes), end


class Request(NamedTuple):
    """Transmission request header, 28 bytes (a WRITE's data follows, outside the codec)::

        C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)
        C: 16 bits, command flags
        C: 16 bits, type
        C: 64 bits, handle (a.k.a. cookie)
        C: 64 bits, offset (unsigned)
        C: 32 bits, length (unsigned)

    A NamedTuple (immutable, like the frozen dataclasses here) because one is built per
    request: 0.27 µs against 0.66 for a frozen dataclass, at 100k+ requests/s.
    """

    flags: int
    type: int
    handle: int
    offset: int
    length: int

    SIZE = REQUEST.size

    def encode(self) -> bytes:
        return REQUEST.pack(REQUEST_MAGIC, self.flags, self.type, self.handle, self.offset, self.length)

    @classmethod
    def decode(cls, buf: Buffer) -> tuple[Request, int] | None:
        if not _need(buf, cls.SIZE):
            return None
        magic, flags, typ, handle, offset, length = REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            raise MalformedMessage(f"bad request magic 0x{magic:08x}")
        return cls(flags, typ, handle, offset, length), cls.SIZE


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """Simple reply header, 16 bytes (a successful READ's data follows, outside the codec)::

        S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
        S: 32 bits, error (MAY be zero)
        S: 64 bits, handle
    """

    error: int
    handle: int

    SIZE = SIMPLE_REPLY.size

    def encode(self) -> bytes:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, self.error, self.handle)

    @classmethod
    def decode(cls, buf: Buffer) -> tuple[SimpleReply, int] | None:
        if not _need(buf, cls.SIZE):
            return None
        magic, error, handle = SIMPLE_REPLY.unpack_from(buf)
        if magic != SIMPLE_REPLY_MAGIC:
            raise MalformedMessage(f"bad simple reply magic 0x{magic:08x}")
        return cls(error, handle), cls.SIZE


def encode_simple_reply(error: int, handle: int) -> bytes:
    """Fast path of ``SimpleReply(error, handle).encode()`` for the adapter's hot loop."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


@dataclass(frozen=True, slots=True)
class StructuredChunk:
    """One structured reply chunk, header and payload (a READ's data stays outside the
    codec: for ``OFFSET_DATA`` the payload here is only its 8-byte offset)::

        S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)
        S: 16 bits, flags (NBD_REPLY_FLAG_DONE on the last chunk of a reply)
        S: 16 bits, type (NBD_REPLY_TYPE_*)
        S: 64 bits, handle
        S: 32 bits, length of payload (for OFFSET_DATA: 8 + the data's length)
        S: payload
    """

    flags: int
    type: int
    handle: int
    length: int
    payload: bytes

    HEADER = CHUNK.size

    def encode(self) -> bytes:
        return CHUNK.pack(STRUCTURED_REPLY_MAGIC, self.flags, self.type, self.handle, self.length) + self.payload

    @classmethod
    def decode(cls, buf: Buffer) -> tuple[StructuredChunk, int] | None:
        """The header and the payload; for OFFSET_DATA only the 8-byte offset is taken
        (``consumed`` stops there, the data follows)."""
        if not _need(buf, cls.HEADER):
            return None
        magic, flags, typ, handle, length = CHUNK.unpack_from(buf)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise MalformedMessage(f"bad structured reply magic 0x{magic:08x}")
        take = 8 if typ == ReplyType.OFFSET_DATA else length
        if typ == ReplyType.OFFSET_DATA and length < 8:
            raise MalformedMessage(f"OFFSET_DATA chunk of {length} bytes has no offset")
        if not _need(buf, cls.HEADER + take):
            return None
        payload = bytes(buf[cls.HEADER : cls.HEADER + take])
        return cls(flags, typ, handle, length, payload), cls.HEADER + take

    def error(self) -> tuple[int, str]:
        """(errno, message) of an error chunk."""
        if not self.type & (1 << 15) or len(self.payload) < 6:
            raise MalformedMessage(f"chunk type {self.type} is not an error with its 6-byte payload")
        errno, n = struct.unpack_from(">IH", self.payload)
        if 6 + n > len(self.payload):
            raise MalformedMessage("error message runs past the chunk")
        return errno, self.payload[6 : 6 + n].decode(errors="replace")


def encode_read_chunk(handle: int, offset: int, length: int) -> bytes:
    """Header of the one OFFSET_DATA chunk (flag DONE) of a successful READ of ``length``
    bytes at ``offset``; the data follows.  One chunk, so the DF flag is always honoured."""
    return _DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, 1, 1, handle, 8 + length, offset)  # DONE, OFFSET_DATA


def encode_error_chunk(error: int, handle: int, message: bytes = b"") -> bytes:
    """A failed command's reply as one ERROR chunk (flag DONE)."""
    return _ERROR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, int(ReplyFlag.DONE), int(ReplyType.ERROR), handle,
                             6 + len(message), error, len(message)) + message


def encode_read_error(error: int, handle: int, structured: bool) -> bytes:
    """A failed READ's reply: once structured replies are negotiated a READ MUST NOT get a
    simple reply, errors included, so one ERROR chunk; a simple reply otherwise."""
    return encode_error_chunk(error, handle) if structured else encode_simple_reply(error, handle)


# --- option payloads (the ``data`` of OptionRequest / OptionReply) -----------------


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Data of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``::

        C: 32 bits, length of name (unsigned); MUST be no larger than option length - 6
        C: String: name of the export
        C: 16 bits, number of information requests
        C: 16 bits x n - list of NBD_INFO information requests
    """

    name: str
    info_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        name = encode_string(self.name)
        types = b"".join(_U16.pack(t) for t in self.info_types)
        return _U32.pack(len(name)) + name + _U16.pack(len(self.info_types)) + types

    @classmethod
    def decode(cls, data: Buffer) -> InfoRequest:
        if len(data) < 6:
            raise MalformedMessage("INFO/GO data shorter than 6 bytes")
        (name_len,) = _U32.unpack_from(data)
        if name_len > len(data) - 6:
            raise MalformedMessage("INFO/GO name length past the option data")
        name = decode_string(data[4:4 + name_len])
        (count,) = _U16.unpack_from(data, 4 + name_len)
        rest = data[6 + name_len:]
        if len(rest) != 2 * count:
            raise MalformedMessage("INFO/GO request count does not match the option length")
        types = struct.unpack(f">{count}H", rest) if count else ()
        return cls(name, tuple(types))


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """Data of ``NBD_REP_SERVER``::

        S: 32 bits, length of name (unsigned); MUST be no larger than reply length - 4
        S: String, name of the export
        S: the rest: implementation-specific details (a human-readable string)
    """

    name: str
    details: str = ""

    def encode(self) -> bytes:
        name = encode_string(self.name)
        return _U32.pack(len(name)) + name + encode_string(self.details)

    @classmethod
    def decode(cls, data: Buffer) -> ServerEntry:
        if len(data) < 4:
            raise MalformedMessage("NBD_REP_SERVER data shorter than 4 bytes")
        (name_len,) = _U32.unpack_from(data)
        if name_len > len(data) - 4:
            raise MalformedMessage("NBD_REP_SERVER name length past the reply data")
        return cls(decode_string(data[4:4 + name_len]), decode_string(data[4 + name_len:]))


@dataclass(frozen=True, slots=True)
class InfoExport:
    """``NBD_INFO_EXPORT``: 16 bits type (0), 64 bits export size, 16 bits transmission flags."""

    size: int
    transmission_flags: int

    def encode(self) -> bytes:
        return _INFO_EXPORT.pack(InfoType.EXPORT, self.size, self.transmission_flags)


@dataclass(frozen=True, slots=True)
class InfoName:
    """``NBD_INFO_NAME``: 16 bits type (1), String: canonical name of the export."""

    name: str

    def encode(self) -> bytes:
        return _U16.pack(InfoType.NAME) + encode_string(self.name)


@dataclass(frozen=True, slots=True)
class InfoDescription:
    """``NBD_INFO_DESCRIPTION``: 16 bits type (2), String: description of the export."""

    description: str

    def encode(self) -> bytes:
        return _U16.pack(InfoType.DESCRIPTION) + encode_string(self.description)


@dataclass(frozen=True, slots=True)
class InfoBlockSize:
    """``NBD_INFO_BLOCK_SIZE``: 16 bits type (3), 32 bits minimum, preferred, maximum."""

    minimum: int
    preferred: int
    maximum: int

    def encode(self) -> bytes:
        return _INFO_BLOCK.pack(InfoType.BLOCK_SIZE, self.minimum, self.preferred, self.maximum)


InfoItem = Union[InfoExport, InfoName, InfoDescription, InfoBlockSize]


def decode_info(data: Buffer) -> InfoItem:
    """Decode the data of an ``NBD_REP_INFO`` reply; unknown types are malformed."""
    if len(data) < 2:
        raise MalformedMessage("NBD_REP_INFO data shorter than 2 bytes")
    (kind,) = _U16.unpack_from(data)
    if kind == InfoType.EXPORT and len(data) == _INFO_EXPORT.size:
        _, size, flags = _INFO_EXPORT.unpack_from(data)
        return InfoExport(size, flags)
    if kind == InfoType.BLOCK_SIZE and len(data) == _INFO_BLOCK.size:
        _, lo, pref, hi = _INFO_BLOCK.unpack_from(data)
        return InfoBlockSize(lo, pref, hi)
    if kind == InfoType.NAME:
        return InfoName(decode_string(data[2:]))
    if kind == InfoType.DESCRIPTION:
        return InfoDescription(decode_string(data[2:]))
    raise MalformedMessage(f"unknown or mis-sized NBD_INFO type {kind}")
