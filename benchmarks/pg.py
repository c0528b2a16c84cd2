"""A throwaway PostgreSQL cluster for benchmarks (pg_ctl runs as `postgres`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_CTL = ROOT / "tools" / "pg_ctl_as_postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pvsfarm-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def __enter__(self) -> ThrowawayPostgres:
        self.data.mkdir()
        subprocess.run([str(PG_CTL), "initdb", "-D", str(self.data), "-o", "-A trust -U postgres"], check=True,
                       capture_output=True)
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k /tmp -c fsync=off -c max_connections=200"
        subprocess.run([str(PG_CTL), "start", "-w", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log")],
                       check=True, capture_output=True)
        return self

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([str(PG_CTL), "stop", "-D", str(self.data), "-m", mode], capture_output=True)

    def start_again(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k /tmp -c fsync=off -c max_connections=200"
        subprocess.run([str(PG_CTL), "start", "-w", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log")],
                       check=True, capture_output=True)

    def __exit__(self, *exc: object) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
