"""`pvsfarm node` with no arguments starts on the embedded default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sqlalchemy import create_engine, text


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output so far: {lines}")


def test_node_starts_on_embedded_default_with_dhcp_off(tmp_path: Path) -> None:
    env = {**os.environ, "PVSFARM_DATA_DIR": str(tmp_path / "data")}
    env.pop("PVSFARM_CONFIG", None)
    env.pop("PVSFARM_DB", None)
    proc = subprocess.Popen([sys.executable, "-m", "pvsfarm", "node"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = wait_for_line(proc, "node ready", 30)
        out = "\n".join(lines)
        assert "dhcp: off" in out
        assert "listening on" in out
        assert "TCP congestion control cubic" in out  # nbd.tcp_congestion's default
        with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=5) as resp:
            assert json.load(resp)["status"] == "ok"
        assert (tmp_path / "data" / "pvsfarm.sqlite").exists()
        assert (tmp_path / "data" / "store").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, rest
    assert "node stopped" in rest
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'pvsfarm.sqlite'}")
    with engine.connect() as conn:
        state = conn.execute(text("select state from servers")).scalar_one()
        stores = conn.execute(text("select path, shared, server_id from stores")).all()
    assert state == "down"
    assert [(p, bool(sh), sid is not None) for p, sh, sid in stores] == [
        (str((tmp_path / "data" / "store").resolve()), False, True)]


def test_node_refuses_a_congestion_control_the_kernel_does_not_have(tmp_path: Path) -> None:
    """nbd.tcp_congestion is checked at start, before any NBD worker runs: one line that
    names the key and what is available, a non-zero exit, and the node marked down."""
    config = tmp_path / "pvsfarm.yaml"
    config.write_text("http: {enabled: false}\ntftp: {enabled: false}\n"
                      "nbd: {listen_address: 127.0.0.1, listen_port: 0, tcp_congestion: no-such-cc}\n")
    env = {**os.environ, "PVSFARM_DATA_DIR": str(tmp_path / "data"), "PVSFARM_CONFIG": str(config)}
    env.pop("PVSFARM_DB", None)
    proc = subprocess.run([sys.executable, "-m", "pvsfarm", "node"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "nbd.tcp_congestion: cannot use 'no-such-cc'" in proc.stdout
    assert "available: " in proc.stdout and "cubic" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert "node stopped" in proc.stdout
