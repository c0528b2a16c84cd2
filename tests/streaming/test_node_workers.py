"""A real node with NBD workers (nbd.workers, default one per CPU): its workers serve the targets' connections and never
outlive the node (kill -9) nor keep serving for a hung one (SIGSTOP)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvsfarm.streaming.nbd import wire
from tests.nodes import RunningNode, admin, start_node
from tests.streaming.test_node_streaming import MAC, base_image, login, pytestmark  # noqa: F401


@pytest.fixture
def node(tmp_path: Path, sqlite_url: str, base_image: Path) -> Iterator[RunningNode]:  # noqa: F811
    started = start_node(tmp_path, "n1", sqlite_url)  # nbd.workers defaults to one per CPU
    try:
        admin(sqlite_url, "vdisk", "add", "base", "--file", str(base_image), "--no-copy", config=started.config)
        admin(sqlite_url, "device", "add", "--mac", MAC, "--name", "t1", "--vdisk", "base")
        admin(sqlite_url, "bootstrap", "configure", "--server", "n1")
        yield started
    finally:
        if started.proc.poll() is None:
            os.kill(started.proc.pid, signal.SIGCONT)
        started.stop()


def children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def holds_socket_to(pid: int, client: socket.socket) -> bool:
    port = client.getsockname()[1]
    with open("/proc/net/tcp") as f:
        inodes = {line.split()[9] for line in f.readlines()[1:] if int(line.split()[2].split(":")[1], 16) == port}
    try:
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    return any(f"socket:[{i}]" in links for i in inodes)


def go(port: int, name: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.recv(wire.ServerGreeting.SIZE, socket.MSG_WAITALL)
    s.sendall(wire.ClientFlags(wire.ClientFlag.FIXED_NEWSTYLE | wire.ClientFlag.NO_ZEROES).encode())
    s.sendall(wire.OptionRequest(wire.Opt.GO, wire.InfoRequest(name, ()).encode()).encode())
    while True:
        hdr = s.recv(wire.OptionReply.HEADER_SIZE, socket.MSG_WAITALL)
        body = s.recv(int.from_bytes(hdr[16:20], "big"), socket.MSG_WAITALL) if hdr[16:20] != bytes(4) else b""
        rep, _ = wire.OptionReply.decode(hdr + body)
        if rep.reply_type == wire.Rep.ACK:
            return s
        assert not rep.reply_type & (1 << 31), rep


def read(s: socket.socket, offset: int, length: int) -> bytes:
    s.sendall(wire.Request(0, wire.Cmd.READ, 7, offset, length).encode())
    reply = s.recv(16, socket.MSG_WAITALL)
    assert wire.SimpleReply.decode(reply)[0].error == 0
    return s.recv(length, socket.MSG_WAITALL)


def served_by_worker(node: RunningNode, s: socket.socket) -> int:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        for pid in children(node.proc.pid):
            if holds_socket_to(pid, s):
                return pid
        time.sleep(0.05)
    raise AssertionError("no worker of the node holds the connection")


def closed_by_server(s: socket.socket, timeout_s: float = 15) -> bool:
    s.settimeout(timeout_s)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_workers_serve_real_clients(node: RunningNode, base_image: Path, tmp_path: Path) -> None:  # noqa: F811
    export = str(login(node)["export"])
    uri = f"nbd://127.0.0.1:{node.nbd_port}/{export}"
    held = go(node.nbd_port, export)  # keeps the session's write cache open
    worker = served_by_worker(node, held)
    assert worker != node.proc.pid
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4096 65536", uri], check=True,
                   capture_output=True, timeout=30)
    assert read(held, 4096, 65536) == b"\xab" * 65536  # written through another connection
    out = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", "--connections=4", uri, str(out)], check=True, timeout=120)
    expected = bytearray(base_image.read_bytes())
    expected[4096 : 4096 + 65536] = b"\xab" * 65536
    assert out.read_bytes() == bytes(expected)
    held.close()


def test_health_reports_the_workers_and_their_busy_polling(node: RunningNode) -> None:
    s = go(node.nbd_port, str(login(node)["export"]))
    served_by_worker(node, s)
    for i in range(100):  # queue depth 1: every reply on a quiet worker is followed by a wait
        assert len(read(s, i * 4096, 4096)) == 4096
    end = time.monotonic() + 10
    while True:
        nbd = node.get_json("/health")["nbd"]
        polled = nbd["busy_poll"]
        if sum(polled.values()) > 0 or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert nbd["workers"] == (os.cpu_count() or 1)
    assert nbd["connections"] == 1
    assert set(polled) == {"hits", "misses", "skipped"}
    assert sum(polled.values()) > 0, polled  # reported by the worker within its 0.5 s period
    s.close()


def test_kill_9_of_the_node_closes_the_workers_connections(node: RunningNode) -> None:
    s = go(node.nbd_port, str(login(node)["export"]))
    worker = served_by_worker(node, s)
    assert len(read(s, 0, 4096)) == 4096
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    assert closed_by_server(s)
    end = time.monotonic() + 5
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < end:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}")


def test_a_hung_node_s_workers_stop_serving(node: RunningNode) -> None:
    s = go(node.nbd_port, str(login(node)["export"]))
    served_by_worker(node, s)
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        assert closed_by_server(s)  # well before the farm's dead_after_s + takeover
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
