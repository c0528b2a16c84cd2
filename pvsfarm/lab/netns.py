"""Network namespaces on one bridged Ethernet segment (demo and tests).

The bridge lives in ``<prefix>-<tag>-sw``; every host is a namespace whose
``eth0`` is a veth plugged into it. Nothing here touches the machine's own
interfaces, and `Segment.delete` removes every namespace it made.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid

from pvsfarm.errors import PvsfarmError

LINK_UP_TIMEOUT_S = 5.0


class NetnsError(PvsfarmError):
    """An `ip` command failed, or a link did not come up."""


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def wait_up(ns: str, ifname: str, timeout_s: float = LINK_UP_TIMEOUT_S) -> None:
    """operstate UP: until linkwatch attaches the real qdisc (up to ~1 s after
    ``link set up``), frames sent on the link are dropped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                             capture_output=True, text=True, timeout=10).stdout
        if json.loads(out or "[{}]")[0].get("operstate") == "UP":
            return
        time.sleep(0.02)
    raise NetnsError(f"{ns}/{ifname} did not come up")


class Segment:
    """Namespaces ``<prefix>-<tag>-<role>`` bridged on one segment.

    ``wait_each``: `host` waits for its links to come up (tests send at once);
    otherwise call `wait_up_all` after adding every host (one wait for all).
    """

    def __init__(self, prefix: str, *, wait_each: bool = True) -> None:
        self.prefix, self.tag, self.wait_each = prefix, uuid.uuid4().hex[:6], wait_each
        self.namespaces: list[str] = []
        self.ports: list[str] = []
        self.sw = self._netns("sw")
        ip("-n", self.sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        ip("-n", self.sw, "link", "set", "br0", "up")

    def _netns(self, role: str) -> str:
        name = f"{self.prefix}-{self.tag}-{role}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def host(self, role: str, *, mac: object | None = None, addr: str | None = None) -> str:
        """A namespace whose eth0 is plugged into the bridge (``mac``: anything whose str() is a MAC)."""
        ns = self._netns(role)
        port = f"p-{role}"[:15]
        ip("-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.sw, "link", "set", port, "master", "br0", "up")
        if mac is not None:
            ip("-n", ns, "link", "set", "eth0", "address", str(mac))
        if addr is not None:
            ip("-n", ns, "addr", "add", addr, "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.ports.append(port)
        if self.wait_each:
            wait_up(ns, "eth0")
            wait_up(self.sw, port)
        return ns

    def wait_up_all(self) -> None:
        for ns in self.namespaces[1:]:
            wait_up(ns, "eth0")
        for port in self.ports:
            wait_up(self.sw, port)

    def delete(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self.namespaces.clear()
