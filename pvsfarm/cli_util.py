"""Output helpers for the CLI: tables, JSON, progress on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def emit_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], empty: str) -> None:
    if not rows:
        click.echo(empty)
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def emit_record(record: dict[str, Any]) -> None:
    width = max(len(k) for k in record)
    for key, value in record.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            click.echo(f"{key}:")
            for item in value:
                click.echo("  - " + ", ".join(f"{k}={_cell(v)}" for k, v in item.items()))
        else:
            click.echo(f"{key.ljust(width)}  {_cell(value)}")


def progress_printer(label: str) -> Callable[[int, int], None]:
    """A progress callback writing ``label: 42% (x/y MiB)`` to stderr at most 4x a second."""
    last = [0.0]
    interactive = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.25:
            return
        last[0] = now
        pct = 100 * done // total if total else 100
        line = f"{label}: {pct}% ({done >> 20}/{total >> 20} MiB)"
        if interactive:
            sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
        elif done >= total or pct % 10 == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return report
