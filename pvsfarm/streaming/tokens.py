"""Export tokens: what a target was given at login, verifiable by any node.

A token binds (session id, device MAC, vDisk, server, issue time) and is
signed with the farm secret (HMAC-SHA256), so the server named in it can
check it from memory — opening an export never waits on the database, and
still works while the database is down. Names are not guessable paths.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from pvsfarm.errors import RemoteProtocolError

MAC_BYTES = 16
"""Truncated HMAC: 128 bits is ample against guessing and keeps names short."""
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True, slots=True)
class ExportGrant:
    session_id: str
    mac: str
    vdisk: str
    server: str
    issued_at: int

    def payload(self) -> bytes:
        return "|".join((self.session_id, self.mac, self.vdisk, self.server, str(self.issued_at))).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(grant: ExportGrant, secret: bytes) -> str:
    body = grant.payload()
    tag = hmac.new(secret, body, hashlib.sha256).digest()[:MAC_BYTES]
    return f"{_b64(body)}.{_b64(tag)}"


def verify(token: str, secret: bytes, now: float, ttl_s: float) -> ExportGrant:
    """The grant in ``token``; RemoteProtocolError when forged, malformed or expired."""
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise RemoteProtocolError("unknown export")
    body_text, tag_text = token.split(".")
    try:
        body, tag = _unb64(body_text), _unb64(tag_text)
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError("unknown export") from exc
    expected = hmac.new(secret, body, hashlib.sha256).digest()[:MAC_BYTES]
    if not hmac.compare_digest(tag, expected):
        raise RemoteProtocolError("unknown export")
    parts = body.decode("utf-8", "replace").split("|")
    if len(parts) != 5 or not parts[4].isdigit():
        raise RemoteProtocolError("unknown export")
    grant = ExportGrant(parts[0], parts[1], parts[2], parts[3], int(parts[4]))
    if now - grant.issued_at > ttl_s or grant.issued_at - now > 300:
        raise RemoteProtocolError("expired export")
    return grant
