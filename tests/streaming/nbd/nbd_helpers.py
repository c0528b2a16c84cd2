"""Shared helpers for the NBD server tests: test devices, a raw protocol client, and
running real NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io) without blocking the loop."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pvsfarm.streaming.nbd import DictResolver, Extent, FileDevice, OpenedExport, start_nbd_server, wire
from pvsfarm.streaming.nbd.wire import ClientFlag, Opt, Rep

IMAGE_BYTES = 4 * 2**20 + 3 * 4096  # not a power of two: catches off-by-one at the end
BLOCK = 64 * 1024
TIMEOUT_S = 10.0

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")),
    reason="needs libnbd-bin and qemu-utils",
)


class HoleDevice(FileDevice):
    """Every third 64 KiB block reads as zeros (fd -1 extents): multi-extent reads."""

    def read_extents(self, offset: int, length: int) -> list[Extent]:
        out, end = [], offset + length
        while offset < end:
            stop = min(end, (offset // BLOCK + 1) * BLOCK)
            fd = -1 if (offset // BLOCK) % 3 == 1 else self.fd
            out.append(Extent(fd, offset, stop - offset))
            offset = stop
        return out

    @staticmethod
    def expected(data: bytes) -> bytes:
        out = bytearray(data)
        for start in range(BLOCK, len(out), 3 * BLOCK):
            out[start : start + BLOCK] = bytes(len(out[start : start + BLOCK]))
        return bytes(out)


class FailingDevice(FileDevice):
    """Reads at or past 1 MiB fail with EIO; writes fail with ENOSPC."""

    def read_extents(self, offset: int, length: int) -> list[Extent]:
        if offset + length > 2**20:
            raise OSError(errno.EIO, "injected read error")
        return super().read_extents(offset, length)

    def pwrite(self, offset: int, data, fua: bool) -> None:
        raise OSError(errno.EDQUOT, "injected quota error")


@dataclass
class Tracker:
    """Counts the resolver callbacks."""

    read: int = 0
    written: int = 0
    closed: int = 0
    opened: list[str] = field(default_factory=list)

    def on_io(self, nread: int, nwritten: int) -> None:
        self.read += nread
        self.written += nwritten

    def on_close(self) -> None:
        self.closed += 1


class TestResolver(DictResolver):
    """DictResolver plus callbacks, and an export whose resolver raises."""

    __test__ = False

    def __init__(self, factories, tracker: Tracker) -> None:
        super().__init__(factories, descriptions={"ro": "read-only test image"})
        self.tracker = tracker

    def open_export(self, name: str, peer: tuple[str, int]) -> OpenedExport | None:
        if name == "boom":
            raise RuntimeError("resolver exploded")
        opened = super().open_export(name, peer)
        if opened is not None:
            self.tracker.opened.append(name)
            opened.on_io, opened.on_close = self.tracker.on_io, self.tracker.on_close
        return opened


@dataclass
class Farm:
    port: int
    data: bytes
    ro_path: Path
    rw_path: Path
    tracker: Tracker

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"


async def start_farm(tmp_path: Path, **config: int) -> tuple[asyncio.AbstractServer, Farm]:
    data = os.urandom(IMAGE_BYTES)
    ro, rw = tmp_path / "ro.img", tmp_path / "rw.img"
    ro.write_bytes(data)
    rw.write_bytes(data)
    tracker = Tracker()
    resolver = TestResolver(
        {
            "ro": lambda: FileDevice(ro),
            "rw": lambda: FileDevice(rw, read_only=False),
            "holes": lambda: HoleDevice(ro),
            "failing": lambda: FailingDevice(rw, read_only=False),
        },
        tracker,
    )
    server = await start_nbd_server(resolver, "127.0.0.1", 0, **config)
    port = server.sockets[0].getsockname()[1]
    return server, Farm(port, data, ro, rw, tracker)


async def run(*cmd: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode or 0, out, err


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RawClient:
    """A minimal NBD client speaking raw bytes, to send what real clients never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.structured = False

    @classmethod
    async def connect(cls, port: int, flags: int | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        greeting = await client.read(wire.ServerGreeting.SIZE)
        assert wire.ServerGreeting.decode(greeting) is not None
        if flags is None:
            flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
        client.send(wire.ClientFlags(flags).encode())
        return client

    @classmethod
    async def open(cls, port: int, name: str) -> RawClient:
        client = await cls.connect(port)
        replies = await client.option(Opt.GO, wire.InfoRequest(name).encode())
        assert replies[-1].reply_type == Rep.ACK, replies
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT_S)

    async def option(self, option: int, data: bytes = b"") -> list[wire.OptionReply]:
        """Send one option; read replies up to the final one (ACK or an error)."""
        self.send(wire.OptionRequest(option, data).encode())
        replies = []
        while True:
            header = await self.read(wire.OptionReply.HEADER_SIZE)
            body = await self.read(int.from_bytes(header[16:20], "big"))
            reply, _ = wire.OptionReply.decode(header + body)
            replies.append(reply)
            if reply.reply_type == Rep.ACK or reply.reply_type & (1 << 31):
                return replies

    async def command(
        self, typ: int, offset: int = 0, length: int = 0, *, flags: int = 0, payload: bytes = b"", handle: int = 1
    ) -> tuple[int, bytes]:
        """Send one request; return (error, read data). A structured reply (after
        NBD_OPT_STRUCTURED_REPLY) must be one chunk with flag DONE: OFFSET_DATA at the
        requested offset, or ERROR; ``self.structured`` tells which kind the last reply was."""
        self.send(wire.Request(flags, typ, handle, offset, length).encode() + payload)
        head = await self.read(4)
        self.structured = int.from_bytes(head, "big") == wire.STRUCTURED_REPLY_MAGIC
        if not self.structured:
            reply, _ = wire.SimpleReply.decode(head + await self.read(12))
            assert reply.handle == handle
            data = await self.read(length) if typ == wire.Cmd.READ and reply.error == 0 else b""
            return reply.error, data
        header = head + await self.read(wire.StructuredChunk.HEADER - 4)
        _magic, _flags, kind, _handle, size = wire.CHUNK.unpack(header)
        body = await self.read(8 if kind == wire.ReplyType.OFFSET_DATA else size)
        chunk, _ = wire.StructuredChunk.decode(header + body)
        assert (chunk.handle, chunk.flags) == (handle, wire.ReplyFlag.DONE), chunk
        if chunk.type == wire.ReplyType.OFFSET_DATA:
            assert int.from_bytes(chunk.payload, "big") == offset and chunk.length == 8 + length, chunk
            return 0, await self.read(length)
        return chunk.error()[0], b""

    async def closed_by_server(self) -> bool:
        """True when the server closes the connection (EOF) without sending more."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), TIMEOUT_S)
        except ConnectionResetError:
            return True
        return rest == b""

    def close(self) -> None:
        self.writer.close()


async def assert_served(farm: Farm) -> None:
    """Another client still gets correct data from the server."""
    client = await RawClient.open(farm.port, "ro")
    error, data = await client.command(wire.Cmd.READ, 4096, 8192)
    assert (error, data) == (0, farm.data[4096 : 4096 + 8192])
    client.close()
