"""The error hierarchy of pvsfarm (one root, as in h11/h2).

Protocol errors split into *local* (our own misuse of an API) and *remote* (the
peer sent something invalid); each carries the code it maps to on the wire.
Domain errors are what the service layer raises; the CLI turns any
`PvsfarmError` into one line on stderr and a non-zero exit.
"""

from __future__ import annotations


class PvsfarmError(Exception):
    """Root of every error pvsfarm raises on purpose."""


class ProtocolError(PvsfarmError):
    """A protocol rule was broken. ``code`` is the wire code (TFTP error code,
    NBD errno, HTTP status) the adapter answers with, when it answers."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class MalformedMessage(RemoteProtocolError):
    """Bytes that do not parse as a message. The only error a codec raises."""


class NotFound(PvsfarmError):
    """A named object (device, vDisk, server, export) does not exist."""


class Conflict(PvsfarmError):
    """The change would violate a uniqueness or exclusivity rule."""


class InvalidInput(PvsfarmError):
    """A value given by an operator is not acceptable (bad MAC, bad size...)."""


class NoServerAvailable(PvsfarmError):
    """No live server in the bootstrap holds a verified copy of the vDisk."""


class StoreError(PvsfarmError):
    """A vDisk file or write cache cannot be read, written or created."""


class ConfigError(PvsfarmError):
    """The configuration file is invalid; the message names the dotted path."""


class DatabaseUnavailable(PvsfarmError):
    """The database cannot be reached (or refuses us)."""
