"""The codec and the state machine stay pure: no event loop, sockets, clock or database."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pvsfarm.bootstrap.tftp as pkg

PURE = ["wire", "session", "run_cache"]
FORBIDDEN = {"asyncio", "socket", "time", "sqlalchemy", "selectors", "uvloop", "tftpy"}


@pytest.mark.parametrize("name", PURE)
def test_no_forbidden_direct_imports(name: str) -> None:
    tree = ast.parse((Path(pkg.__file__).parent / f"{name}.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN


def test_no_forbidden_transitive_imports() -> None:
    code = (
        "import sys; before = set(sys.modules)\n"
        + "".join(f"import pvsfarm.bootstrap.tftp.{n}\n" for n in PURE)
        + "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = set(run.stdout.split())
    assert not {m.split(".")[0] for m in loaded} & FORBIDDEN
