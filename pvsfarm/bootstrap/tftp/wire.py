"""TFTP messages: bytes ⇄ frozen dataclasses (RFC 1350, options per RFC 2347).

Packet layouts (RFC 1350 §5, RFC 2347 §"Packet Formats"; integers big-endian)::

    RRQ/WRQ  | 01/02 | filename | 0 | mode | 0 | opt1 | 0 | value1 | 0 | ...
    DATA     | 03    | block #  | data (0..blksize octets)
    ACK      | 04    | block #  |
    ERROR    | 05    | code     | message | 0 |
    OACK     | 06    | opt1 | 0 | value1 | 0 | ...          (RFC 2347)

Opcodes and block numbers are 2 octets.  Strings are NUL terminated; we
decode them as UTF-8 (a superset of the netascii the RFC asks for).  Option
names are case-insensitive (RFC 2347) and are lower-cased on parsing; values
stay strings here: their meaning (RFC 2348/2349/7440) is the session's job.

The codec is hand-written rather than built on tftpy: it is ~150 lines, has no
I/O, and the ACK/DATA fast paths matter for lock-step throughput (each block
costs one parse and one header).  `parse` raises only `MalformedMessage`.
Leniency follows tftpd-hpa/atftpd: octets after an ACK's block number, a
missing NUL after an ERROR message and one trailing empty string after a
request's options are accepted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pvsfarm.errors import LocalProtocolError, MalformedMessage

__all__ = [
    "Ack",
    "Data",
    "Error",
    "ErrorCode",
    "Message",
    "Opcode",
    "OptionAck",
    "Options",
    "ReadRequest",
    "TransferMode",
    "WriteRequest",
    "ack_block",
    "data_header",
    "parse",
    "serialize",
]

MAX_BLOCK = 0xFFFF
"""Block numbers are 16 bits (RFC 1350 §5); longer transfers roll over to 0."""


class Opcode(enum.IntEnum):
    """TFTP opcodes (RFC 1350 §5; OACK from RFC 2347)."""

    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(enum.IntEnum):
    """ERROR packet codes (RFC 1350 Appendix; 8 from RFC 2347)."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_NEGOTIATION = 8


class TransferMode(enum.Enum):
    """Request modes (RFC 1350 §1); matched case-insensitively."""

    NETASCII = "netascii"
    OCTET = "octet"
    MAIL = "mail"


Options = tuple[tuple[str, str], ...]
"""RFC 2347 options in wire order: (lower-case name, value) pairs."""


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """RRQ: the client wants ``filename``."""

    filename: str
    mode: TransferMode = TransferMode.OCTET
    options: Options = ()


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """WRQ: the client wants to store ``filename`` (pvsfarm always refuses)."""

    filename: str
    mode: TransferMode = TransferMode.OCTET
    options: Options = ()


@dataclass(frozen=True, slots=True)
class Data:
    """DATA: block ``block`` (0..65535) carrying ``payload``."""

    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """ACK of block ``block`` (0 acknowledges an OACK, RFC 2347)."""

    block: int


@dataclass(frozen=True, slots=True)
class Error:
    """ERROR: ``code`` is an `ErrorCode` when known, else the raw integer."""

    code: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class OptionAck:
    """OACK: the options the server accepted, with the values in force."""

    options: Options = ()


Message = ReadRequest | WriteRequest | Data | Ack | Error | OptionAck

_ACK = b"\x00\x04"
_DATA = b"\x00\x03"


def data_header(block: int) -> bytes:
    """The 4-octet DATA header for wire block number ``block`` (hot path)."""
    return _DATA + block.to_bytes(2, "big")


def ack_block(data: bytes) -> int | None:
    """The block number if ``data`` is an ACK, else None (the per-block hot
    path of a read transfer: no message object is built)."""
    if data[:2] == _ACK and len(data) >= 4:
        return int.from_bytes(data[2:4], "big")
    return None


def parse(data: bytes) -> Message:
    """Decode one datagram; raise `MalformedMessage` if it is not TFTP."""
    if len(data) < 2:
        raise MalformedMessage("datagram shorter than an opcode")
    if data[:2] == _ACK:  # the hot path of every read transfer
        if len(data) < 4:
            raise MalformedMessage("ACK without block number")
        return Ack(int.from_bytes(data[2:4], "big"))
    op = int.from_bytes(data[:2], "big")
    if op == Opcode.DATA:
        if len(data) < 4:
            raise MalformedMessage("DATA without block number")
        return Data(int.from_bytes(data[2:4], "big"), bytes(data[4:]))
    if op == Opcode.RRQ or op == Opcode.WRQ:
        return _parse_request(op, data[2:])
    if op == Opcode.ERROR:
        return _parse_error(data[2:])
    if op == Opcode.OACK:
        return OptionAck(_pairs(_strings(data[2:])))
    raise MalformedMessage(f"unknown opcode {op}")


def _strings(body: bytes) -> list[str]:
    """NUL-terminated strings; the body must end with a NUL."""
    if not body:
        return []
    if body[-1] != 0:
        raise MalformedMessage("string not NUL terminated")
    try:
        return body[:-1].decode("utf-8").split("\0")
    except UnicodeDecodeError as exc:
        raise MalformedMessage("string is not UTF-8") from exc


def _pairs(strings: list[str]) -> Options:
    if len(strings) % 2 and strings[-1] == "":
        strings = strings[:-1]  # padding some PXE ROMs append
    if len(strings) % 2:
        raise MalformedMessage("option without value")
    return tuple((strings[i].lower(), strings[i + 1]) for i in range(0, len(strings), 2))


def _parse_request(op: int, body: bytes) -> ReadRequest | WriteRequest:
    strings = _strings(body)
    if len(strings) < 2:
        raise MalformedMessage("request without filename and mode")
    try:
        mode = TransferMode(strings[1].lower())
    except ValueError as exc:
        raise MalformedMessage(f"unknown mode {strings[1]!r}") from exc
    cls = ReadRequest if op == Opcode.RRQ else WriteRequest
    return cls(strings[0], mode, _pairs(strings[2:]))


def _parse_error(body: bytes) -> Error:
    if len(body) < 2:
        raise MalformedMessage("ERROR without code")
    raw = int.from_bytes(body[:2], "big")
    text = body[2:]
    if text.endswith(b"\0"):
        text = text[:-1]
    code: int = ErrorCode(raw) if raw in _ERROR_CODES else raw
    return Error(code, text.decode("utf-8", errors="replace").split("\0", 1)[0])


_ERROR_CODES = frozenset(int(c) for c in ErrorCode)


def serialize(msg: Message) -> bytes:
    """Encode one message; raise `LocalProtocolError` on unencodable fields."""
    if isinstance(msg, Ack):
        return _ACK + _u16(msg.block)
    if isinstance(msg, Data):
        return _DATA + _u16(msg.block) + msg.payload
    if isinstance(msg, (ReadRequest, WriteRequest)):
        op = Opcode.RRQ if isinstance(msg, ReadRequest) else Opcode.WRQ
        fields = [msg.filename, msg.mode.value, *_flatten(msg.options)]
        return _u16(op) + _join(fields)
    if isinstance(msg, Error):
        return _u16(Opcode.ERROR) + _u16(msg.code) + _join([msg.message])
    if isinstance(msg, OptionAck):
        return _u16(Opcode.OACK) + _join(_flatten(msg.options))
    raise LocalProtocolError(f"not a TFTP message: {msg!r}")


def _u16(value: int) -> bytes:
    if not 0 <= value <= MAX_BLOCK:
        raise LocalProtocolError(f"{value} does not fit 16 bits")
    return value.to_bytes(2, "big")


def _flatten(options: Options) -> list[str]:
    return [s for pair in options for s in pair]


def _join(strings: list[str]) -> bytes:
    if any("\0" in s for s in strings):
        raise LocalProtocolError("TFTP strings cannot contain NUL")
    return b"".join(s.encode("utf-8") + b"\0" for s in strings)
