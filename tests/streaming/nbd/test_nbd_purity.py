"""The pure NBD layers import no I/O, clock or database modules (STYLE.md layering)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pvsfarm

PKG_ROOT = Path(pvsfarm.__file__).resolve().parent
FORBIDDEN = {"asyncio", "socket", "time", "sqlalchemy", "selectors", "uvloop", "threading"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def pvsfarm_closure(module: str) -> dict[str, set[str]]:
    """Imports of ``module`` and of every pvsfarm module it reaches (package
    ``__init__`` files excluded: importing a submodule by path does not need them)."""
    seen: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = PKG_ROOT.parent / (mod.replace(".", "/") + ".py")
        if not path.exists():  # a package: its __init__ is not part of the closure
            seen[mod] = set()
            continue
        seen[mod] = imported_modules(path)
        todo += [m for m in seen[mod] if m.startswith("pvsfarm.")]
    return seen


@pytest.mark.parametrize("module", ["pvsfarm.streaming.nbd.wire", "pvsfarm.streaming.nbd.session"])
def test_pure_modules_import_no_io(module: str) -> None:
    closure = pvsfarm_closure(module)
    assert module in closure and closure[module]
    for mod, imports in closure.items():
        bad = {name for name in imports if name.split(".")[0] in FORBIDDEN}
        assert not bad, f"{mod} imports {bad}"


def test_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom asyncio import sleep\n")
    assert "asyncio" in imported_modules(sample)
