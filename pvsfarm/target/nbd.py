"""The target's NBD client: fixed newstyle handshake with NBD_OPT_GO, then simple READs and WRITEs.

Handshake (NBD ``doc/proto.md``, "Fixed newstyle negotiation")::

    S: NBDMAGIC IHAVEOPT flags(16)      C: client flags(32)
    C: IHAVEOPT NBD_OPT_GO len {name, info requests}
    S: NBD_REP_INFO (EXPORT: size, transmission flags) ...  S: NBD_REP_ACK

Then one request at a time (READ: header → simple reply + data; WRITE: header +
data → simple reply), which is all a booting OS's first stage needs and makes
the in-flight request trivially retryable on another server after a failover
(a READ of the base is idempotent; a WRITE rewrites the same bytes at the same
place). Connection-level failures become `StreamLost`; a server's error reply
or garbage is `BootFailed`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from pvsfarm.errors import MalformedMessage
from pvsfarm.streaming.nbd.wire import (
    ClientFlag, ClientFlags, Cmd, CmdFlag, HandshakeFlag, InfoExport, InfoRequest, InfoType, OptionReply,
    OptionRequest, Opt, Rep, Request, ServerGreeting, SimpleReply, TransmissionFlag, decode_info,
)
from pvsfarm.target.errors import BootFailed, StreamLost

MAX_OPTION_REPLIES = 32
"""Replies to one NBD_OPT_GO before its ACK (a server sends a few INFOs)."""
MAX_OPTION_REPLY_BYTES = 64 * 1024
LINK_ERRORS = (OSError, asyncio.IncompleteReadError, TimeoutError, EOFError)


@dataclass
class NbdClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    size_bytes: int
    transmission_flags: int
    peer: str

    def __post_init__(self) -> None:
        self._handles = itertools.count(1)

    @classmethod
    async def connect(cls, host: str, port: int, export: str, *, timeout_s: float = 5.0) -> NbdClient:
        """Connect and negotiate ``export``; `StreamLost` if the server cannot be reached."""
        peer = f"{host}:{port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except LINK_ERRORS as exc:
            raise StreamLost(f"nbd {peer}: cannot connect: {exc!r}") from exc
        try:
            size, flags = await asyncio.wait_for(_negotiate(reader, writer, export, peer), timeout_s)
        except LINK_ERRORS as exc:
            writer.close()
            raise StreamLost(f"nbd {peer}: handshake failed: {exc!r}") from exc
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, size, flags, peer)

    async def read(self, offset: int, length: int, *, timeout_s: float = 5.0) -> bytes:
        """One NBD_CMD_READ; `StreamLost` on a link failure, `BootFailed` on an error reply."""
        handle = next(self._handles)
        try:
            return await asyncio.wait_for(self._read(handle, offset, length), timeout_s)
        except LINK_ERRORS as exc:
            raise StreamLost(f"nbd {self.peer}: read of {length} bytes at {offset} failed: {exc!r}") from exc

    async def write(self, offset: int, data: bytes, *, fua: bool = False, timeout_s: float = 5.0) -> None:
        """One NBD_CMD_WRITE, acknowledged when this returns; errors as `read`."""
        if self.transmission_flags & TransmissionFlag.READ_ONLY:
            raise BootFailed("nbd", f"{self.peer}: the export is read-only")
        handle = next(self._handles)
        try:
            await asyncio.wait_for(self._write(handle, offset, data, fua), timeout_s)
        except LINK_ERRORS as exc:
            raise StreamLost(f"nbd {self.peer}: write of {len(data)} bytes at {offset} failed: {exc!r}") from exc

    async def _read(self, handle: int, offset: int, length: int) -> bytes:
        self.writer.write(Request(0, Cmd.READ, handle, offset, length).encode())
        await self.writer.drain()
        await self._reply(handle, "read", offset)
        return await self.reader.readexactly(length)

    async def _write(self, handle: int, offset: int, data: bytes, fua: bool) -> None:
        flags = int(CmdFlag.FUA) if fua else 0
        self.writer.writelines((Request(flags, Cmd.WRITE, handle, offset, len(data)).encode(), data))
        await self.writer.drain()
        await self._reply(handle, "write", offset)

    async def _reply(self, handle: int, what: str, offset: int) -> None:
        header = await self.reader.readexactly(SimpleReply.SIZE)
        try:
            decoded = SimpleReply.decode(header)
        except MalformedMessage as exc:
            raise BootFailed("nbd", f"{self.peer}: {exc}") from exc
        assert decoded is not None  # SIZE bytes were read
        reply = decoded[0]
        if reply.handle != handle:
            raise BootFailed("nbd", f"{self.peer}: reply for handle {reply.handle}, expected {handle}")
        if reply.error:
            raise BootFailed("nbd", f"{self.peer}: {what} at {offset} failed with errno {reply.error}")

    async def close(self) -> None:
        """NBD_CMD_DISC then close; never raises (the link may be dead already)."""
        try:
            if not self.writer.is_closing():
                self.writer.write(Request(0, Cmd.DISC, next(self._handles), 0, 0).encode())
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (*LINK_ERRORS, RuntimeError):
            pass


async def _negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: str,
                     peer: str) -> tuple[int, int]:
    try:
        decoded = ServerGreeting.decode(await reader.readexactly(ServerGreeting.SIZE))
    except MalformedMessage as exc:
        raise BootFailed("nbd", f"{peer}: {exc}") from exc
    assert decoded is not None
    server_flags = decoded[0].handshake_flags
    if not server_flags & HandshakeFlag.FIXED_NEWSTYLE:
        raise BootFailed("nbd", f"{peer}: server does not speak fixed newstyle")
    client = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if server_flags & HandshakeFlag.NO_ZEROES else 0)
    go = OptionRequest(Opt.GO, InfoRequest(export, (InfoType.BLOCK_SIZE,)).encode())
    writer.write(ClientFlags(int(client)).encode() + go.encode())
    await writer.drain()
    return await _go_replies(reader, peer)


async def _go_replies(reader: asyncio.StreamReader, peer: str) -> tuple[int, int]:
    export: InfoExport | None = None
    for _ in range(MAX_OPTION_REPLIES):
        reply = await _option_reply(reader, peer)
        if reply.option != Opt.GO:
            raise BootFailed("nbd", f"{peer}: reply to option {reply.option}, expected NBD_OPT_GO")
        if reply.reply_type == Rep.ACK:
            if export is None:
                raise BootFailed("nbd", f"{peer}: NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            return export.size, export.transmission_flags
        if reply.reply_type == Rep.INFO:
            item = _info(reply.data)
            export = item if isinstance(item, InfoExport) else export
            continue
        if reply.reply_type & (1 << 31):
            text = reply.data.decode("utf-8", "replace")
            name = Rep(reply.reply_type).name if reply.reply_type in Rep._value2member_map_ else reply.reply_type
            raise BootFailed("nbd", f"{peer}: export refused ({name}){': ' + text if text else ''}")
    raise BootFailed("nbd", f"{peer}: no NBD_REP_ACK after {MAX_OPTION_REPLIES} replies")


async def _option_reply(reader: asyncio.StreamReader, peer: str) -> OptionReply:
    buf = await reader.readexactly(OptionReply.HEADER_SIZE)
    length = int.from_bytes(buf[-4:], "big")
    if length > MAX_OPTION_REPLY_BYTES:
        raise BootFailed("nbd", f"{peer}: option reply of {length} bytes")
    buf += await reader.readexactly(length)
    try:
        decoded = OptionReply.decode(buf)
    except MalformedMessage as exc:
        raise BootFailed("nbd", f"{peer}: {exc}") from exc
    assert decoded is not None
    return decoded[0]


def _info(data: bytes) -> object:
    try:
        return decode_info(data)
    except MalformedMessage:
        return None  # an information type we did not ask about: the spec says ignore it
