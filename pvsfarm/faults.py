"""Fault injection for tests: ``POST /admin/fault`` on a node's HTTP port.

``{"service": "tftp", "state": "down"}`` makes the node's TFTP drop every
request (a hung service, as the HA article's crashed TFTP); ``"up"`` undoes
it. The switch only breaks the service: the health check has to notice on
its own, which is the point of the tests that use it.

Refused (403) unless the node's config sets ``admin_faults: true``, and
refused (403) to any peer that is not on loopback, whatever the config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from pvsfarm.addr import is_loopback

log = logging.getLogger("pvsfarm.faults")
PATH = "/admin/fault"
STATES = {"down": True, "up": False}


def _peer_host(request: web.Request) -> str | None:
    # The socket's peer, not request.remote: that one may be rewritten by proxies' headers.
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else None


@dataclass
class FaultSwitch:
    """Maps a service name to a setter taking True (break it) or False (heal it)."""

    enabled: bool
    services: dict[str, Callable[[bool], None]] = field(default_factory=dict)

    def routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        peer = _peer_host(request)
        if not is_loopback(peer):
            return web.json_response({"error": "admin endpoints answer loopback peers only"}, status=403)
        if not self.enabled:
            return web.json_response({"error": "fault injection is off (config: admin_faults)"}, status=403)
        try:
            body = json.loads(await request.read())
            service, state = body["service"], body["state"]
            setter, down = self.services[service], STATES[state]
        except (ValueError, KeyError, TypeError):
            known = ", ".join(sorted(self.services)) or "none"
            return web.json_response({"error": f'expected {{"service": {known}, "state": "down"|"up"}}'},
                                     status=400)
        setter(down)
        log.warning("fault injection: %s %s (requested from %s)", service, state, peer)
        return web.json_response({"service": service, "state": state})
