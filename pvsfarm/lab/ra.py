"""A tiny IPv6 router-advertisement sender for a QEMU boot segment (e2e tests, ``pvsfarm demo``).

iPXE waits ~13-16 s for an IPv6 router after DHCPv4 unless one advertises
(lab REPORT Q2 point 3). This answers every router solicitation at once and
advertises unsolicited every second, on one interface, until killed.

Usage: ``python3 ra.py IFNAME [PREFIX]`` (run inside the segment's namespace).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import sys
import time

ICMPV6_RS, ICMPV6_RA = 133, 134
ALL_NODES, ALL_ROUTERS = "ff02::1", "ff02::2"
PERIOD_S = 1.0


def advertisement(prefix: ipaddress.IPv6Network) -> bytes:
    """RFC 4861 §4.2 RA (checksum left to the kernel, as for every raw ICMPv6 socket)
    with one §4.6.2 prefix-information option: on-link + autonomous."""
    header = struct.pack("!BBHBBHII", ICMPV6_RA, 0, 0, 64, 0, 1800, 0, 0)
    option = struct.pack("!BBBBIII16s", 3, 4, prefix.prefixlen, 0xC0, 86400, 14400, 0,
                         prefix.network_address.packed)
    return header + option


def main(ifname: str, prefix_text: str = "fd77::/64") -> None:
    index = socket.if_nametoindex(ifname)
    packet = advertisement(ipaddress.IPv6Network(prefix_text))
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # §6.1.2: hop limit 255
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    group = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@I", index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
    print(f"ra: advertising {prefix_text} on {ifname}", flush=True)
    next_at = 0.0
    while True:
        now = time.monotonic()
        solicited = False
        readable, _, _ = select.select([sock], [], [], max(0.0, next_at - now))
        if readable:
            data, _peer = sock.recvfrom(2048)
            solicited = bool(data) and data[0] == ICMPV6_RS
        if solicited or time.monotonic() >= next_at:
            try:
                sock.sendto(packet, (ALL_NODES, 0, 0, index))
            except OSError as exc:  # no usable link-local address yet (DAD): next period
                print(f"ra: send failed: {exc}", flush=True)
            next_at = time.monotonic() + PERIOD_S


if __name__ == "__main__":
    main(*sys.argv[1:])
