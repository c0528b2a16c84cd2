"""NBD block streaming: wire codec, pure session, asyncio server, device interface.

Public entry points: :func:`start_nbd_server`, :class:`NbdConfig`, :func:`install_uvloop`,
and the backend interface (:class:`BlockDevice`, :class:`Extent`, :class:`OpenedExport`,
:class:`ExportResolver`) with :class:`FileDevice` and :class:`DictResolver`.
``handoff.WorkerPool`` (main process) and ``worker`` (the worker processes) move
connections to other processes after the handshake (``nbd.workers``).
"""

from pvsfarm.streaming.nbd.backend import (
    BlockDevice,
    DictResolver,
    ExportResolver,
    Extent,
    FileDevice,
    OpenedExport,
)
from pvsfarm.streaming.nbd.config import NbdConfig
from pvsfarm.streaming.nbd.server import NbdServerProtocol, install_uvloop, start_nbd_server

__all__ = [
    "BlockDevice",
    "DictResolver",
    "ExportResolver",
    "Extent",
    "FileDevice",
    "NbdConfig",
    "NbdServerProtocol",
    "OpenedExport",
    "install_uvloop",
    "start_nbd_server",
]
