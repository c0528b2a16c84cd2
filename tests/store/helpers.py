"""Helpers shared by the store tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

MakeBase = Callable[..., Path]
REPO_ROOT = Path(__file__).resolve().parents[2]


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic random content, so base bytes are never mistaken for zeros."""
    return random.Random(seed).randbytes(size)
