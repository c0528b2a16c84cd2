"""The pure DHCP modules import no I/O, clock or database modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = ("asyncio", "socket", "time", "sqlalchemy", "dhcppython")


@pytest.mark.parametrize("module", ["pvsfarm.bootstrap.dhcp.wire",
                                    "pvsfarm.bootstrap.dhcp.session"])
def test_pure_module_imports(module: str) -> None:
    # The interpreter itself may preload `time` (site, .pth hooks): only
    # modules that importing `module` adds count.
    code = (f"import sys; before = set(sys.modules); import {module}; "
            f"print(','.join(m for m in {FORBIDDEN!r} "
            f"if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"{module} pulls in {out}"


@pytest.mark.parametrize("module", ["pvsfarm.bootstrap.dhcp.wire",
                                    "pvsfarm.bootstrap.dhcp.session"])
def test_pure_module_source_imports(module: str) -> None:
    """Catches direct imports of modules the interpreter had preloaded."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
    names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert not names & set(FORBIDDEN)
