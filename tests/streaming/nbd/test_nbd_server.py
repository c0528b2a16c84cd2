"""The asyncio NBD server against real clients and hostile raw input (127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pvsfarm.streaming.nbd import wire
from pvsfarm.streaming.nbd.wire import Cmd, Errno, Opt, Rep

from .nbd_helpers import (
    IMAGE_BYTES,
    Farm,
    HoleDevice,
    RawClient,
    assert_served,
    needs_tools,
    run,
    sha256,
    start_farm,
)


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[Farm]:
    server, farm = await start_farm(tmp_path)
    yield farm
    server.close()
    await server.wait_closed()


# --- real clients -----------------------------------------------------------------------


async def test_runs_on_the_parametrized_loop(request: pytest.FixtureRequest) -> None:
    kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
    assert ("uvloop" if kind == "uvloop" else "asyncio") in request.node.name


@needs_tools
async def test_nbdinfo_size_and_list(farm: Farm) -> None:
    rc, out, err = await run("nbdinfo", "--size", farm.uri("ro"))
    assert rc == 0, err
    assert int(out) == IMAGE_BYTES
    rc, out, err = await run("nbdinfo", "--list", "--json", farm.uri(""))
    assert rc == 0, err
    assert b'"export-name": "ro"' in out and b'"export-name": "rw"' in out


@needs_tools
async def test_qemu_img_convert_is_byte_identical(farm: Farm, tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    rc, _, err = await run("qemu-img", "convert", "-f", "raw", "-O", "raw", farm.uri("ro"), str(out))
    assert rc == 0, err
    assert out.read_bytes() == farm.data


@needs_tools
@pytest.mark.parametrize("sendfile_min_bytes", [128 * 1024, 0])
async def test_nbdcopy_sha256_matches(tmp_path: Path, sendfile_min_bytes: int) -> None:
    server, farm = await start_farm(tmp_path, sendfile_min_bytes=sendfile_min_bytes)
    try:
        rc, out, err = await run("nbdcopy", "--connections=4", "--request-size=1048576", farm.uri("ro"), "-")
        assert rc == 0, err
        assert sha256(out) == sha256(farm.data)
        assert farm.tracker.read == IMAGE_BYTES  # on_io saw every byte once
        assert farm.tracker.closed == len(farm.tracker.opened) >= 1  # on_close per open
    finally:
        server.close()
        await server.wait_closed()


@needs_tools
async def test_zero_extents_read_as_zeros(farm: Farm) -> None:
    rc, out, err = await run("nbdcopy", farm.uri("holes"), "-")
    assert rc == 0, err
    assert out == HoleDevice.expected(farm.data)


@needs_tools
async def test_qemu_io_write_zero_trim_flush_then_read_back(farm: Farm) -> None:
    rc, out, err = await run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 0 64k",
        "-c", "write -z 64k 64k",
        "-c", "write -P 0xcd -f 1m 4k",  # -f: FUA
        "-c", "discard 2m 4k",
        "-c", "flush",
        "-c", "read -P 0xab 0 64k",
        farm.uri("rw"),
    )  # fmt: skip
    assert rc == 0 and b"verification failed" not in out, out + err
    disk = farm.rw_path.read_bytes()
    assert disk[:65536] == b"\xab" * 65536
    assert disk[65536:131072] == bytes(65536)
    assert disk[2**20 : 2**20 + 4096] == b"\xcd" * 4096
    assert disk[2 * 2**20 : 2 * 2**20 + 4096] == bytes(4096)  # FileDevice trims to zeros
    assert disk[131072 : 2**20] == farm.data[131072 : 2**20]  # nothing else touched
    assert farm.tracker.written >= 65536 + 4096


@needs_tools
async def test_qemu_io_write_to_read_only_export_fails(farm: Farm) -> None:
    rc, out, err = await run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4k", farm.uri("ro"))
    assert rc != 0 or b"failed" in out + err
    assert farm.ro_path.read_bytes() == farm.data


# --- handshake misbehaviour ---------------------------------------------------------------


async def test_unknown_option_then_go_still_works(farm: Farm) -> None:
    client = await RawClient.connect(farm.port)
    (reply,) = await client.option(0x1234, b"junk")
    assert reply.reply_type == Rep.ERR_UNSUP
    replies = await client.option(Opt.GO, wire.InfoRequest("ro").encode())
    assert replies[-1].reply_type == Rep.ACK
    assert await client.command(Cmd.READ, 0, 512) == (0, farm.data[:512])
    assert not client.structured
    client.close()


async def test_structured_replies_answer_reads_with_one_chunk(farm: Farm) -> None:
    """After NBD_OPT_STRUCTURED_REPLY: READs (plain, DF, large via sendfile, failed) get one
    chunk each; other commands may keep simple replies; the export advertises DF."""
    client = await RawClient.connect(farm.port)
    (reply,) = await client.option(Opt.STRUCTURED_REPLY, b"x")
    assert reply.reply_type == Rep.ERR_INVALID  # the option takes no data
    (reply,) = await client.option(Opt.STRUCTURED_REPLY)
    assert reply.reply_type == Rep.ACK
    replies = await client.option(Opt.GO, wire.InfoRequest("ro").encode())
    assert replies[-1].reply_type == Rep.ACK
    info = wire.decode_info(replies[0].data)
    assert isinstance(info, wire.InfoExport)
    assert info.transmission_flags & wire.TransmissionFlag.SEND_DF
    assert await client.command(Cmd.READ, 4096, 512) == (0, farm.data[4096:4608]) and client.structured
    assert await client.command(Cmd.READ, 0, 4096, flags=wire.CmdFlag.DF) == (0, farm.data[:4096])
    big = len(farm.data) // 2
    assert await client.command(Cmd.READ, 0, big, handle=7) == (0, farm.data[:big])  # sendfile path
    assert await client.command(Cmd.READ, len(farm.data), 512) == (Errno.EINVAL, b"") and client.structured
    assert await client.command(Cmd.READ, 0, 512, flags=1 << 9) == (Errno.EINVAL, b"") and client.structured
    assert await client.command(Cmd.FLUSH) == (0, b"")
    client.close()
    await assert_served(farm)


async def test_unknown_export_reveals_nothing(farm: Farm) -> None:
    client = await RawClient.connect(farm.port)
    (reply,) = await client.option(Opt.GO, wire.InfoRequest("nope").encode())
    assert reply.reply_type == Rep.ERR_UNKNOWN and b"nope" not in reply.data
    (reply,) = await client.option(Opt.GO, wire.InfoRequest("boom").encode())  # resolver raises
    assert reply.reply_type == Rep.ERR_UNKNOWN and reply.data == b"export not available"
    client.send(wire.OptionRequest(Opt.EXPORT_NAME, b"nope").encode())
    assert await client.closed_by_server()
    await assert_served(farm)


async def test_export_name_enters_transmission(farm: Farm) -> None:
    client = await RawClient.connect(farm.port)
    client.send(wire.OptionRequest(Opt.EXPORT_NAME, b"ro").encode())
    reply, _ = wire.ExportNameReply.decode(await client.read(10), zeroes=False)
    assert reply.size == IMAGE_BYTES and reply.transmission_flags & wire.TransmissionFlag.READ_ONLY
    assert await client.command(Cmd.READ, IMAGE_BYTES - 4096, 4096) == (0, farm.data[-4096:])
    client.send(wire.Request(0, Cmd.DISC, 2, 0, 0).encode())
    assert await client.closed_by_server()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE!" * 4,  # not IHAVEOPT
        wire._OPT_HDR.pack(wire.IHAVEOPT, Opt.GO, 1 << 20),  # option length past the maximum
        wire._OPT_HDR.pack(wire.IHAVEOPT, Opt.GO, 2**32 - 1) + b"x" * 100,
    ],
)
async def test_handshake_garbage_closes_and_is_logged(farm: Farm, garbage: bytes, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pvsfarm.streaming.nbd")
    client = await RawClient.connect(farm.port)
    client.send(garbage)
    assert await client.closed_by_server()
    assert any("closing" in r.getMessage() for r in caplog.records)
    await assert_served(farm)


async def test_unknown_client_flags_close(farm: Farm) -> None:
    client = await RawClient.connect(farm.port, flags=0xFFFF)
    assert await client.closed_by_server()
    await assert_served(farm)


# --- transmission misbehaviour -------------------------------------------------------------


@pytest.mark.parametrize(
    ("export", "typ", "offset", "length", "payload", "errno"),
    [
        ("ro", Cmd.READ, IMAGE_BYTES - 4096, 4097, b"", Errno.EINVAL),  # past the end
        ("ro", Cmd.READ, 0, 32 * 2**20 + 1, b"", Errno.EINVAL),  # over 32 MiB
        ("rw", Cmd.WRITE, IMAGE_BYTES - 1, 2, b"xx", Errno.ENOSPC),  # write past the end
        ("ro", Cmd.WRITE, 0, 4, b"evil", Errno.EPERM),  # read-only export
        ("ro", Cmd.TRIM, 0, 4096, b"", Errno.EPERM),
        ("rw", 42, 0, 512, b"", Errno.EINVAL),  # unknown command
        ("failing", Cmd.READ, 2**20, 4096, b"", Errno.EIO),  # device read error
        ("failing", Cmd.WRITE, 0, 4, b"data", Errno.ENOSPC),  # EDQUOT maps to ENOSPC
    ],
)
async def test_bad_requests_get_nbd_errors(farm: Farm, export, typ, offset, length, payload, errno) -> None:
    client = await RawClient.open(farm.port, export)
    assert await client.command(typ, offset, length, payload=payload, handle=5) == (errno, b"")
    # the same connection keeps working, and so does everyone else
    error, data = await client.command(Cmd.READ, 0, 512, handle=6)
    assert error == 0 and len(data) == 512
    client.close()
    await assert_served(farm)
    assert farm.ro_path.read_bytes() == farm.data


async def test_bad_request_magic_closes(farm: Farm) -> None:
    client = await RawClient.open(farm.port, "ro")
    client.send(b"\xde\xad\xbe\xef" + bytes(24))
    assert await client.closed_by_server()
    await assert_served(farm)


async def test_client_disappearing_mid_write(farm: Farm, caplog) -> None:
    client = await RawClient.open(farm.port, "rw")
    client.send(wire.Request(0, Cmd.WRITE, 1, 0, 2**20).encode() + b"\xee" * 300_000)
    await client.writer.drain()
    client.writer.transport.abort()  # RST mid-payload
    await asyncio.sleep(0.05)
    await assert_served(farm)
    assert farm.rw_path.read_bytes() == farm.data  # no partial write reached the device
    await _wait_for(lambda: farm.tracker.closed == len(farm.tracker.opened))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no internal error


async def test_client_disappearing_mid_read_reply(farm: Farm, caplog) -> None:
    client = await RawClient.open(farm.port, "ro")
    for handle in range(8):  # 32 MiB of replies queued, never read
        client.send(wire.Request(0, Cmd.READ, handle, 0, 4 * 2**20).encode())
    await client.writer.drain()
    await asyncio.sleep(0.05)
    client.writer.transport.abort()
    await assert_served(farm)
    await _wait_for(lambda: farm.tracker.closed == len(farm.tracker.opened))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no internal error


async def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    assert predicate()


@contextlib.asynccontextmanager
async def _server_side_socket(tmp_path: Path, **config: object) -> AsyncIterator[socket.socket]:
    """The server's socket of one connection to an NBD server with ``NbdConfig(**config)``."""
    from pvsfarm.streaming.nbd import FileDevice
    from pvsfarm.streaming.nbd.backend import DictResolver
    from pvsfarm.streaming.nbd.config import NbdConfig
    from pvsfarm.streaming.nbd.server import NbdServerProtocol

    image = tmp_path / "i.img"
    image.write_bytes(bytes(1 << 20))
    made: list[NbdServerProtocol] = []

    def factory() -> NbdServerProtocol:
        made.append(NbdServerProtocol(DictResolver({"": lambda: FileDevice(image)}), NbdConfig(**config)))
        return made[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await _wait_for(lambda: bool(made))
        yield made[0]._transport.get_extra_info("socket")
        writer.close()
    finally:
        server.close()


@pytest.mark.parametrize("send_buffer_bytes", [512 << 10, 1 << 20])
async def test_send_buffer_is_set_on_each_connection(tmp_path: Path, send_buffer_bytes: int) -> None:
    """nbd config send_buffer_bytes: SO_SNDBUF of each connection (Linux caps it at
    net.core.wmem_max and doubles it)."""
    async with _server_side_socket(tmp_path, send_buffer_bytes=send_buffer_bytes) as sock:
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    assert got == 2 * min(send_buffer_bytes, wmem_max)


@pytest.mark.parametrize("lowat", [256 << 10, 0])
async def test_unsent_data_limit_is_set_on_each_connection(tmp_path: Path, lowat: int) -> None:
    """nbd config notsent_lowat_bytes: each connection's TCP_NOTSENT_LOWAT (0 keeps the
    system's: the socket then reads 0, "use net.ipv4.tcp_notsent_lowat")."""
    async with _server_side_socket(tmp_path, notsent_lowat_bytes=lowat) as sock:
        got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    assert got == lowat


def _system_congestion() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def _not_the_systems() -> str:
    """A congestion control every Linux kernel has built in that is not the system's
    default, so a connection cannot carry it by chance."""
    return "cubic" if _system_congestion() == "reno" else "reno"


@pytest.mark.parametrize("explicit", [True, False])
async def test_congestion_control_is_set_on_each_connection(tmp_path: Path, explicit: bool) -> None:
    """nbd config tcp_congestion: each connection's TCP_CONGESTION ("" keeps the system's)."""
    congestion = _not_the_systems() if explicit else ""
    async with _server_side_socket(tmp_path, tcp_congestion=congestion) as sock:
        got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    assert got == (congestion or _system_congestion())


async def test_an_unusable_congestion_control_stops_the_server_from_starting() -> None:
    from pvsfarm.errors import ConfigError
    from pvsfarm.streaming.nbd.backend import DictResolver
    from pvsfarm.streaming.nbd.server import check_tcp_congestion, start_nbd_server

    check_tcp_congestion("")  # the system's: nothing to check
    check_tcp_congestion("reno")
    with pytest.raises(ConfigError, match=r"nbd.tcp_congestion: cannot use 'no-such-cc'.*available: .*reno"):
        await start_nbd_server(DictResolver({}), "127.0.0.1", 0, tcp_congestion="no-such-cc")


def test_the_benchmark_server_refuses_an_unusable_congestion_control_in_one_line(tmp_path: Path) -> None:
    """benchmarks/nbd_serve.py checks the name before it starts any worker, and says why in one line."""
    import subprocess
    import sys

    image = tmp_path / "img.raw"
    image.write_bytes(bytes(2**20))
    serve = Path(__file__).parents[3] / "benchmarks" / "nbd_serve.py"
    done = subprocess.run([sys.executable, str(serve), str(image), "--port", "0", "--tcp-congestion", "no-such-cc"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # one line, no traceback
    assert done.stderr.startswith("nbd_serve: nbd.tcp_congestion: cannot use 'no-such-cc'"), done.stderr
    assert "listening" not in done.stdout
