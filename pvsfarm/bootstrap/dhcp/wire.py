"""DHCPv4 wire format: bytes <-> `DhcpMessage` (RFC 2131 §2, RFC 2132).

Hand-written rather than layered on dhcppython: the fixed header is one
``struct`` call and options stay raw ``(code, bytes)`` pairs, so a parse costs
a few microseconds (the farm must keep up with a boot storm).

RFC 2131 §2, Figure 1::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------+---------------+---------------+---------------+
    |     op (1)    |   htype (1)   |   hlen (1)    |   hops (1)    |
    +---------------+---------------+---------------+---------------+
    |                            xid (4)                            |
    +-------------------------------+-------------------------------+
    |           secs (2)            |           flags (2)           |
    +-------------------------------+-------------------------------+
    |                          ciaddr  (4)                          |
    |                          yiaddr  (4)                          |
    |                          siaddr  (4)                          |
    |                          giaddr  (4)                          |
    +---------------------------------------------------------------+
    |                          chaddr  (16)                         |
    |                          sname   (64)                         |
    |                          file    (128)                        |
    +---------------------------------------------------------------+
    |       magic cookie 99.130.83.99 (RFC 2131 §3) + options       |
    +---------------------------------------------------------------+

Options are kept in wire order as ``(code, value)`` pairs, Pad and End
omitted. Option overload (52) is not interpreted: no client pvsfarm serves
puts options in ``sname``/``file``, and we never send it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pvsfarm.addr import MacAddress
from pvsfarm.errors import LocalProtocolError, MalformedMessage

MAGIC_COOKIE = b"\x63\x82\x53\x63"  # RFC 2131 §3
FLAG_BROADCAST = 0x8000  # RFC 2131 §2, Figure 2
SERVER_PORT = 67
CLIENT_PORT = 68
PXE_PORT = 4011  # PXE 2.1 §2.2.5: ProxyDHCP/boot-server requests
#: A request larger than one Ethernet frame's UDP payload (1500 - 20 - 8) is
#: not something any firmware sends; refusing it bounds the parse cost.
MAX_MESSAGE_BYTES = 1472
#: RFC 1542 §3.4: some BOOTP relays drop messages shorter than 300 octets.
MIN_REPLY_BYTES = 300

_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")
HEADER_BYTES = _HEADER.size  # 240, cookie included
_ZERO = IPv4Address(0)


class Op(enum.IntEnum):
    """RFC 2131 §2 ``op``."""

    BOOTREQUEST = 1
    BOOTREPLY = 2


class MessageType(enum.IntEnum):
    """RFC 2132 §9.6, option 53."""

    DHCPDISCOVER = 1
    DHCPOFFER = 2
    DHCPREQUEST = 3
    DHCPDECLINE = 4
    DHCPACK = 5
    DHCPNAK = 6
    DHCPRELEASE = 7
    DHCPINFORM = 8


class OptionCode(enum.IntEnum):
    """Option codes pvsfarm reads or writes (RFC 2132 names unless noted)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DOMAIN_NAME_SERVER = 6
    HOST_NAME = 12
    DOMAIN_NAME = 15
    BROADCAST_ADDRESS = 28
    VENDOR_SPECIFIC_INFORMATION = 43
    REQUESTED_IP_ADDRESS = 50
    IP_ADDRESS_LEASE_TIME = 51
    OPTION_OVERLOAD = 52
    DHCP_MESSAGE_TYPE = 53
    SERVER_IDENTIFIER = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAXIMUM_DHCP_MESSAGE_SIZE = 57
    RENEWAL_TIME_VALUE = 58
    REBINDING_TIME_VALUE = 59
    VENDOR_CLASS_IDENTIFIER = 60
    CLIENT_IDENTIFIER = 61
    TFTP_SERVER_NAME = 66
    BOOTFILE_NAME = 67
    USER_CLASS = 77  # RFC 3004
    RELAY_AGENT_INFORMATION = 82  # RFC 3046
    CLIENT_SYSTEM_ARCHITECTURE = 93  # RFC 4578 §2.1
    CLIENT_NETWORK_INTERFACE = 94  # RFC 4578 §2.2
    CLIENT_MACHINE_IDENTIFIER = 97  # RFC 4578 §2.3
    IPXE_ENCAPSULATED = 175  # iPXE "encap" options (ipxe.org/cfg)
    END = 255


class PxeSubOption(enum.IntEnum):
    """Option 43 sub-options when option 60 is ``PXEClient`` (PXE 2.1 §2.4)."""

    PXE_DISCOVERY_CONTROL = 6


#: PXE 2.1 §2.4, PXE_DISCOVERY_CONTROL bit 3: boot the file named in this
#: offer, no boot-server discovery (avoids PXE-E55 waits on port 4011).
PXE_DISCOVERY_USE_BOOTFILE = 0x08


class IpxeSubOption(enum.IntEnum):
    """Option 175 sub-options (iPXE ``include/ipxe/dhcp.h``)."""

    PRIORITY = 1
    NO_PXEDHCP = 176


class ClientArch(enum.IntEnum):
    """RFC 4578 §2.1 / IANA processor architecture types (option 93)."""

    X86_BIOS = 0
    EFI_IA32 = 6
    EFI_BC = 7  # in practice x86-64 UEFI (RFC 4578 errata 4505)
    EFI_X86_64 = 9


@dataclass(frozen=True, slots=True, kw_only=True)
class DhcpMessage:
    """One BOOTP/DHCP message. ``chaddr`` is a `MacAddress` when htype=1 and
    hlen=6 (Ethernet), else the raw 16 octets. ``sname``/``file`` are the
    octets before the first NUL. ``options`` are ``(code, value)`` in order."""

    op: Op
    xid: int
    chaddr: MacAddress | bytes
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = _ZERO
    yiaddr: IPv4Address = _ZERO
    siaddr: IPv4Address = _ZERO
    giaddr: IPv4Address = _ZERO
    sname: bytes = b""
    file: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    _index: dict[int, bytes] | None = field(default=None, init=False, repr=False,
                                            compare=False)
    """code -> joined value, built on the first `option` call: answering one
    request looks up ~11 options (a scan each was ~10 % of the server's CPU)."""

    def option(self, code: int) -> bytes | None:
        """The value of ``code``; repeated instances are joined (RFC 3396 §5)."""
        index = self._index
        if index is None:
            index = {}
            for c, v in self.options:
                index[c] = index[c] + v if c in index else v
            object.__setattr__(self, "_index", index)
        return index.get(code)

    @property
    def message_type(self) -> MessageType | None:
        """Option 53, or None when absent or not a known type (plain BOOTP)."""
        value = self.option(OptionCode.DHCP_MESSAGE_TYPE)
        if value is None or len(value) != 1 or not 1 <= value[0] <= 8:
            return None
        return MessageType(value[0])

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)


def _addr(packed: bytes) -> IPv4Address:
    return _ZERO if packed == b"\0\0\0\0" else IPv4Address(packed)


def parse(data: bytes) -> DhcpMessage:
    """Decode one UDP payload. Raises only `MalformedMessage`."""
    if len(data) < HEADER_BYTES:
        raise MalformedMessage(f"truncated: {len(data)} < {HEADER_BYTES} octets")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"oversize: {len(data)} > {MAX_MESSAGE_BYTES} octets")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi,
     chaddr, sname, file, cookie) = _HEADER.unpack_from(data)
    if cookie != MAGIC_COOKIE:
        raise MalformedMessage("bad magic cookie (plain BOOTP is not served)")
    if op != 1 and op != 2:
        raise MalformedMessage(f"bad op {op}")
    if hlen > 16:
        raise MalformedMessage(f"bad hlen {hlen}")
    return DhcpMessage(
        op=Op(op), htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs,
        flags=flags, ciaddr=_addr(ci), yiaddr=_addr(yi), siaddr=_addr(si),
        giaddr=_addr(gi),
        chaddr=MacAddress(chaddr[:6]) if htype == 1 and hlen == 6 else chaddr,
        sname=sname.partition(b"\0")[0], file=file.partition(b"\0")[0],
        options=_parse_options(data, HEADER_BYTES),
    )


def _parse_options(data: bytes, i: int) -> tuple[tuple[int, bytes], ...]:
    options = []
    end = len(data)
    while i < end:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            break
        if i + 1 >= end:
            raise MalformedMessage(f"option {code} has no length octet")
        stop = i + 2 + data[i + 1]
        if stop > end:
            raise MalformedMessage(f"option {code} runs past the end")
        options.append((code, data[i + 2:stop]))
        i = stop
    return tuple(options)


def serialize(msg: DhcpMessage) -> bytes:
    """Encode ``msg``; values over 255 octets are split (RFC 3396 §7).

    Raises `LocalProtocolError` for values that cannot be encoded (our bug).
    """
    chaddr = msg.chaddr.packed if isinstance(msg.chaddr, MacAddress) else msg.chaddr
    if len(chaddr) > 16 or len(msg.sname) > 64 or len(msg.file) > 128:
        raise LocalProtocolError("chaddr/sname/file too long")
    try:
        head = _HEADER.pack(
            msg.op, msg.htype, msg.hlen, msg.hops, msg.xid, msg.secs, msg.flags,
            msg.ciaddr.packed, msg.yiaddr.packed, msg.siaddr.packed,
            msg.giaddr.packed, chaddr, msg.sname, msg.file, MAGIC_COOKIE)
    except struct.error as exc:
        raise LocalProtocolError(f"header field out of range: {exc}") from exc
    parts = [head]
    for code, value in msg.options:
        if not 0 < code < 255:
            raise LocalProtocolError(f"option code {code} cannot be sent")
        if len(value) <= 255:
            parts.append(bytes((code, len(value))) + value)
        else:
            for at in range(0, len(value), 255):
                chunk = value[at:at + 255]
                parts.append(bytes((code, len(chunk))) + chunk)
    parts.append(b"\xff")
    out = b"".join(parts)
    if len(out) < MIN_REPLY_BYTES:
        out += bytes(MIN_REPLY_BYTES - len(out))
    return out


def encode_suboptions(items: "list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...]") -> bytes:
    """Encapsulated options for 43/175 (RFC 2132 §8.4): code, len, value..., End."""
    out = bytearray()
    for code, value in items:
        if not 0 < code < 255 or len(value) > 255:
            raise LocalProtocolError(f"sub-option {code} cannot be encoded")
        out += bytes((code, len(value)))
        out += value
    out.append(255)
    return bytes(out)


def decode_suboptions(value: bytes) -> tuple[tuple[int, bytes], ...]:
    """Inverse of `encode_suboptions` (End optional). Raises `MalformedMessage`."""
    return _parse_options(value, 0)


def ipxe_options(*, no_pxedhcp: bool = True, priority: int | None = None) -> bytes:
    """Option 175 value: 176=1 tells iPXE not to wait for ProxyDHCP offers
    (saves ~3 s per DHCP, lab REPORT Q2); 1=priority (signed) ranks servers."""
    items = []
    if priority is not None:
        items.append((IpxeSubOption.PRIORITY, struct.pack("!b", priority)))
    if no_pxedhcp:
        items.append((IpxeSubOption.NO_PXEDHCP, b"\x01"))
    return encode_suboptions(items)


def pxe_vendor_options() -> bytes:
    """Option 43 for PXEClient replies: boot the named file, no discovery."""
    return encode_suboptions([(PxeSubOption.PXE_DISCOVERY_CONTROL,
                               bytes((PXE_DISCOVERY_USE_BOOTFILE,)))])
