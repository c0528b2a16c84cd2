"""The DHCP decisions: parsed request in, reply (or nothing) out. Pure.

Reservations are static (generated from the device table), so there is no
lease state: every node given the same inventory gives the same answer, which
is what lets two or more nodes serve one segment (MISSION: DHCP row).

Rules, in order (`DhcpResponder.respond`):

1. Drop BOOTREPLYs (another server's answer), non-Ethernet chaddr, plain BOOTP.
2. Look the MAC up in the inventory (a synchronous in-memory call). Unknown →
   ``on_unknown(mac, request)`` and no answer. Disabled, or no reserved IPv4
   inside ``settings.subnet`` → no answer (another server may own it).
3. DISCOVER → OFFER; REQUEST → ACK/NAK by client state (RFC 2131 §4.3.2);
   RELEASE → nothing (static); DECLINE → a warning (someone else holds the
   reserved address), nothing; INFORM → ACK without yiaddr or lease time.
4. Boot information: firmware detection (`select_boot_file`) picks the file
   from options 93 and 77 only; which vDisk boots is decided later, by MAC,
   over HTTP.
5. ProxyDHCP mode (PXE 2.1 §2.2): only PXEClient DISCOVERs (port 67) and
   REQUESTs (port 4011) from known, enabled MACs are answered, with boot
   information only: no yiaddr, lease, mask, router or DNS.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from pvsfarm.addr import MacAddress
from pvsfarm.bootstrap.dhcp.wire import (
    CLIENT_PORT, PXE_PORT, SERVER_PORT, ClientArch, DhcpMessage, MessageType,
    Op, OptionCode as O, ipxe_options, pxe_vendor_options,
)
from pvsfarm.errors import ConfigError
from pvsfarm.views import DeviceView, Inventory

_log = logging.getLogger(__name__)
_ZERO = IPv4Address(0)
_BROADCAST = IPv4Address("255.255.255.255")
_PXECLIENT = b"PXEClient"
_EFI_ARCHES = frozenset({ClientArch.EFI_IA32, ClientArch.EFI_BC, ClientArch.EFI_X86_64})

_TYPE_OCTET = {kind: bytes((kind,)) for kind in MessageType}

UnknownHook = Callable[[MacAddress, DhcpMessage], None]


@dataclass(frozen=True, slots=True)
class DhcpSettings:
    """What one DHCP listener serves on one interface."""

    interface: str
    """Network interface to bind to (SO_BINDTODEVICE); nothing else is heard."""
    server_ip: IPv4Address
    """This node's address on ``interface``: server identifier (option 54)."""
    subnet: IPv4Network
    """The served subnet; only reservations inside it are answered."""
    routers: tuple[IPv4Address, ...] = ()
    """Option 3, in preference order; empty = not sent."""
    dns_servers: tuple[IPv4Address, ...] = ()
    """Option 6, in preference order; empty = not sent."""
    domain_name: str | None = None
    """Option 15."""
    lease_s: int = 86400
    """Lease time in seconds. One day: reservations never move, so a long
    lease only means fewer renewals, and running targets ride out a
    farm-wide DHCP outage of up to T1 = 12 h without noticing (dnsmasq's 1 h
    default would turn a 30-minute outage into address loss risk)."""
    tftp_server: IPv4Address | None = None
    """siaddr and option 66; None = ``server_ip`` (each node names itself:
    the client fetches from the server whose offer it took, lab REPORT Q8)."""
    bios_loader: str = "undionly.kpxe"
    """Boot file for option 93 = 0 (or absent) non-iPXE clients."""
    efi_loader: str = "ipxe.efi"
    """Boot file for option 93 = 6, 7, 9 (EFI IA32 / x86-64) non-iPXE clients."""
    ipxe_script_url: str = "boot.ipxe"
    """Boot file for clients that say they are iPXE (option 77), so the
    loader is not chain-loaded again (lab REPORT Q7 "loop"). A TFTP name or
    an ``http://server:port/bootstrap.ipxe`` URL."""
    proxy_mode: bool = False
    """ProxyDHCP: another server owns addresses; send boot information only."""
    ipxe_no_pxedhcp: bool = True
    """Send option 175.176 = 1 to iPXE: no ~3 s ProxyDHCP wait (lab REPORT)."""
    ipxe_priority: int | None = None
    """Option 175.1 (-128..127). Lab Q8: only the preferred node should set
    it, and only that node ``ipxe_no_pxedhcp``, for a deterministic winner."""

    def __post_init__(self) -> None:
        if not self.proxy_mode and self.server_ip not in self.subnet:
            raise ConfigError(f"dhcp.server_ip: {self.server_ip} not in {self.subnet}")
        if not 60 <= self.lease_s <= 0xFFFFFFFE:
            raise ConfigError("dhcp.lease_s: expected 60..4294967294")
        for name in ("bios_loader", "efi_loader", "ipxe_script_url"):
            if not 0 < len(getattr(self, name).encode()) <= 255:
                raise ConfigError(f"dhcp.{name}: expected 1..255 octets")
        if self.ipxe_priority is not None and not -128 <= self.ipxe_priority <= 127:
            raise ConfigError("dhcp.ipxe_priority: expected -128..127")


@dataclass(frozen=True, slots=True)
class Reply:
    """A message to send and where: ``address:port`` (RFC 2131 §4.1)."""

    message: DhcpMessage
    address: IPv4Address
    port: int


def user_classes(value: bytes) -> tuple[bytes, ...]:
    """Option 77 as RFC 3004 length-prefixed items; iPXE sends the bare
    string ``iPXE`` instead, so anything that does not parse is one item."""
    items, i = [], 0
    while i < len(value):
        n = value[i]
        if n == 0 or i + 1 + n > len(value):
            return (value,)
        items.append(value[i + 1:i + 1 + n])
        i += 1 + n
    return tuple(items) or (value,)


def is_ipxe(request: DhcpMessage) -> bool:
    """iPXE announces itself in the user class (option 77)."""
    value = request.option(O.USER_CLASS)
    return value is not None and b"iPXE" in user_classes(value)


def client_arch(request: DhcpMessage) -> int | None:
    """First architecture in option 93 (RFC 4578 §2.1), None if absent/bad."""
    value = request.option(O.CLIENT_SYSTEM_ARCHITECTURE)
    if value is None or len(value) < 2 or len(value) % 2:
        return None
    return struct.unpack_from("!H", value)[0]


def select_boot_file(request: DhcpMessage, settings: DhcpSettings) -> str | None:
    """Firmware detection only: iPXE → the script; else by option 93 (absent
    counts as BIOS); an architecture we have no loader for → None."""
    if is_ipxe(request):
        return settings.ipxe_script_url
    arch = client_arch(request)
    if arch is None or arch == ClientArch.X86_BIOS:
        return settings.bios_loader
    if arch in _EFI_ARCHES:
        return settings.efi_loader
    return None


def _addresses(values: tuple[IPv4Address, ...]) -> bytes:
    return b"".join(a.packed for a in values)


@dataclass(slots=True)
class DhcpResponder:
    """Answers for one interface. Holds no lease state; precomputes the
    option values that depend only on ``settings`` (answering is the boot
    storm's hot path: benchmarks/dhcp_bench.py)."""

    settings: DhcpSettings
    inventory: Inventory
    on_unknown: UnknownHook | None = None
    _server_id: bytes = field(init=False, repr=False)
    _head: dict[bool, tuple[tuple[int, bytes], ...]] = field(init=False, repr=False)
    _rest: dict[tuple[bool, bool], dict[int, bytes]] = field(init=False, repr=False)
    _ipxe: bytes | None = field(init=False, repr=False)
    _pxe: bytes = field(init=False, repr=False)
    _tftp: IPv4Address = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s = self.settings
        self._tftp = s.tftp_server or s.server_ip
        self._server_id = s.server_ip.packed
        lease_time = (O.IP_ADDRESS_LEASE_TIME, struct.pack("!I", s.lease_s))
        mask = () if s.proxy_mode else ((O.SUBNET_MASK, s.subnet.netmask.packed),)
        # Required first (53 is added per reply): 54, 51 (leases only), 1.
        self._head = {lease: ((O.SERVER_IDENTIFIER, self._server_id),
                              *((lease_time,) if lease else ()), *mask)
                      for lease in (False, True)}
        rest: dict[int, bytes] = {O.TFTP_SERVER_NAME: str(self._tftp).encode()}
        if not s.proxy_mode:
            rest[O.BROADCAST_ADDRESS] = s.subnet.broadcast_address.packed
            if s.routers:
                rest[O.ROUTER] = _addresses(s.routers)
            if s.dns_servers:
                rest[O.DOMAIN_NAME_SERVER] = _addresses(s.dns_servers)
            if s.domain_name:
                rest[O.DOMAIN_NAME] = s.domain_name.encode()
        timers = {O.RENEWAL_TIME_VALUE: struct.pack("!I", s.lease_s // 2),
                  O.REBINDING_TIME_VALUE: struct.pack("!I", s.lease_s * 7 // 8)}
        # The other options we may send, by (lease, boot file), in send order.
        self._rest = {}
        for lease in (False, True):
            for boot in (False, True):
                extra = {**rest, **timers} if lease else dict(rest)
                if not boot:
                    del extra[O.TFTP_SERVER_NAME]
                self._rest[lease, boot] = extra
        self._ipxe = None
        if s.ipxe_no_pxedhcp or s.ipxe_priority is not None:
            self._ipxe = ipxe_options(no_pxedhcp=s.ipxe_no_pxedhcp, priority=s.ipxe_priority)
        self._pxe = pxe_vendor_options()

    def respond(self, request: DhcpMessage, *, local_port: int = SERVER_PORT,
                source: tuple[IPv4Address, int] | None = None) -> Reply | None:
        """The reply to ``request`` received on ``local_port`` from ``source``."""
        if request.op != Op.BOOTREQUEST or not isinstance(request.chaddr, MacAddress):
            return None
        kind = request.message_type
        if kind is None:
            return None
        device = self._device(request, request.chaddr)
        if device is None:
            return None
        if self.settings.proxy_mode:
            return self._proxy(request, kind, device, local_port, source)
        if kind == MessageType.DHCPDISCOVER:
            return self._reply(request, MessageType.DHCPOFFER, device)
        if kind == MessageType.DHCPREQUEST:
            return self._request(request, device)
        if kind == MessageType.DHCPINFORM:
            return self._reply(request, MessageType.DHCPACK, device, inform=True)
        if kind == MessageType.DHCPDECLINE:
            _log.warning("DHCPDECLINE from %s: reserved %s is in use by another host",
                         request.chaddr, device.ipv4)
        elif kind == MessageType.DHCPRELEASE:
            _log.info("DHCPRELEASE from %s (%s); reservation kept", request.chaddr, device.ipv4)
        return None

    def _device(self, request: DhcpMessage, mac: MacAddress) -> DeviceView | None:
        device = self.inventory.device_by_mac(mac)
        if device is None:
            if self.on_unknown is not None:
                self.on_unknown(mac, request)
            return None
        if not device.enabled:
            return None
        if self.settings.proxy_mode:
            return device
        if device.ipv4 is None or device.ipv4 not in self.settings.subnet:
            return None
        if request.giaddr != _ZERO and request.giaddr not in self.settings.subnet:
            return None
        return device

    def _request(self, request: DhcpMessage, device: DeviceView) -> Reply | None:
        """RFC 2131 §4.3.2: SELECTING / INIT-REBOOT / RENEWING-REBINDING."""
        server_id = request.option(O.SERVER_IDENTIFIER)
        requested = request.option(O.REQUESTED_IP_ADDRESS)
        if server_id is not None:
            if server_id != self._server_id:
                return None  # the client took another server's offer
            wanted = requested
        elif requested is not None and request.ciaddr == _ZERO:
            wanted = requested
        elif request.ciaddr != _ZERO:
            wanted = request.ciaddr.packed
        else:
            return None  # neither state: not a valid REQUEST
        if wanted is None or device.ipv4 is None:
            return None  # SELECTING without option 50: not a valid REQUEST
        if wanted != device.ipv4.packed:
            _log.info("DHCPNAK to %s: asked for %s, reserved %s", request.chaddr,
                      ".".join(map(str, wanted)), device.ipv4)
            return self._nak(request)
        return self._reply(request, MessageType.DHCPACK, device)

    def _proxy(self, request: DhcpMessage, kind: MessageType, device: DeviceView,
               local_port: int, source: tuple[IPv4Address, int] | None) -> Reply | None:
        vendor = request.option(O.VENDOR_CLASS_IDENTIFIER)
        if vendor is None or not vendor.startswith(_PXECLIENT):
            return None
        if kind == MessageType.DHCPDISCOVER and local_port == SERVER_PORT:
            return self._reply(request, MessageType.DHCPOFFER, device, proxy=True)
        if kind == MessageType.DHCPREQUEST and local_port == PXE_PORT and source:
            reply = self._reply(request, MessageType.DHCPACK, device, proxy=True)
            if reply is not None:
                return Reply(reply.message, source[0], source[1])
        return None

    def _reply(self, request: DhcpMessage, kind: MessageType, device: DeviceView,
               *, inform: bool = False, proxy: bool = False) -> Reply | None:
        boot_file = select_boot_file(request, self.settings)
        if proxy and boot_file is None:
            return None
        lease = not (inform or proxy)
        options = self._options(request, kind, device, boot_file, lease)
        file = boot_file.encode() if boot_file and len(boot_file) < 128 else b""
        yiaddr = device.ipv4 if lease and device.ipv4 is not None else _ZERO
        ciaddr = request.ciaddr if kind == MessageType.DHCPACK else _ZERO
        message = DhcpMessage(
            op=Op.BOOTREPLY, xid=request.xid, chaddr=request.chaddr,
            htype=request.htype, hlen=request.hlen, flags=request.flags,
            ciaddr=ciaddr, yiaddr=yiaddr, giaddr=request.giaddr,
            siaddr=self._tftp if boot_file else _ZERO, file=file, options=options)
        return self._address(message, request, nak=False)

    def _options(self, request: DhcpMessage, kind: MessageType, device: DeviceView,
                 boot_file: str | None, lease: bool) -> tuple[tuple[int, bytes], ...]:
        """Required first (53, 54, 51, 1), then the client's option 55 order,
        then the rest we always send (boot information must reach clients
        that do not ask for it, e.g. udhcpc)."""
        options = [(O.DHCP_MESSAGE_TYPE, _TYPE_OCTET[kind]), *self._head[lease]]
        available = self._rest[lease, boot_file is not None].copy()
        if boot_file is not None:
            available[O.BOOTFILE_NAME] = boot_file.encode()
        self._client_options(request, available)
        requested = request.option(O.PARAMETER_REQUEST_LIST)
        if requested:
            if O.HOST_NAME in requested:
                available[O.HOST_NAME] = device.name.encode()
            options.extend([(c, available.pop(c)) for c in requested if c in available])
        options.extend(available.items())
        return tuple(options)

    def _client_options(self, request: DhcpMessage, available: dict[int, bytes]) -> None:
        """Echoed or client-dependent: 60/43 for PXE, 175 for iPXE, 61 (RFC
        6842 §3), 82 (RFC 3046 §2.2)."""
        vendor = request.option(O.VENDOR_CLASS_IDENTIFIER)
        if vendor is not None and vendor.startswith(_PXECLIENT):
            available[O.VENDOR_CLASS_IDENTIFIER] = _PXECLIENT
            available[O.VENDOR_SPECIFIC_INFORMATION] = self._pxe
        if self._ipxe is not None and (
                is_ipxe(request) or request.option(O.IPXE_ENCAPSULATED) is not None):
            available[O.IPXE_ENCAPSULATED] = self._ipxe
        for code in (O.CLIENT_IDENTIFIER, O.RELAY_AGENT_INFORMATION):
            value = request.option(code)
            if value is not None:
                available[code] = value

    def _nak(self, request: DhcpMessage) -> Reply:
        options = [(O.DHCP_MESSAGE_TYPE, _TYPE_OCTET[MessageType.DHCPNAK]),
                   (O.SERVER_IDENTIFIER, self._server_id),
                   (O.MESSAGE, b"address not reserved for this client")]
        for code in (O.CLIENT_IDENTIFIER, O.RELAY_AGENT_INFORMATION):
            value = request.option(code)
            if value is not None:
                options.append((code, value))
        message = DhcpMessage(
            op=Op.BOOTREPLY, xid=request.xid, chaddr=request.chaddr,
            htype=request.htype, hlen=request.hlen, flags=request.flags,
            giaddr=request.giaddr, options=tuple(options))
        return self._address(message, request, nak=True)

    @staticmethod
    def _address(message: DhcpMessage, request: DhcpMessage, *, nak: bool) -> Reply:
        """RFC 2131 §4.1. Where the RFC wants unicast to yiaddr at chaddr (no
        broadcast bit, client not yet configured) we broadcast instead: the
        unicast needs an ARP entry injected first (dnsmasq does SIOCSARP),
        and every client also accepts a broadcast reply."""
        if request.giaddr != _ZERO:
            return Reply(message, request.giaddr, SERVER_PORT)
        if nak or request.broadcast or request.ciaddr == _ZERO:
            return Reply(message, _BROADCAST, CLIENT_PORT)
        return Reply(message, request.ciaddr, CLIENT_PORT)
