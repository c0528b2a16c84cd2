"""``pvsfarm audit`` and ``pvsfarm bootstrap iso`` (thin: parse → one service call → print)."""

from __future__ import annotations

from pathlib import Path

import click

from pvsfarm.admin import media
from pvsfarm.admin.audit import GENERATION_SKEW_S, OFFLINE_CACHE_MAX_AGE_S, Limits
from pvsfarm.admin.audit_gather import run_audit
from pvsfarm.bootstrap.iso import IsoSources
from pvsfarm.cli import app_of, json_option, run
from pvsfarm.cli_util import emit_json, emit_table

SEVERE_EXIT = 2
"""Exit status when a finding is severe (1 stays "the command itself failed")."""


@click.command("audit")
@click.option("--offline-max-age-s", type=click.FloatRange(min=0), default=OFFLINE_CACHE_MAX_AGE_S,
              show_default=True, help="Oldest acceptable offline cache save.")
@click.option("--generation-skew-s", type=click.FloatRange(min=0), default=GENERATION_SKEW_S,
              show_default=True, help="How long nodes may serve different reservations after a change.")
@click.option("--standby-known", is_flag=True,
              help="The database has a standby that pg_stat_replication does not show (managed, log shipping).")
@json_option
@click.pass_context
def audit(ctx: click.Context, offline_max_age_s: float, generation_skew_s: float, standby_known: bool,
          as_json: bool) -> None:
    """Name every single point of failure and weak spot, with its fix (exit 2 if any is severe)."""
    limits = Limits(app_of(ctx).config.dead_after_s, offline_max_age_s, generation_skew_s)
    report = run(ctx, lambda s: run_audit(s, limits, standby=True if standby_known else None))
    if as_json:
        emit_json(report)
    else:
        cols = ("severity", "check", "object", "finding", "fix")
        emit_table(report["findings"], cols, "no findings: no single point of failure found")
        counts = report["counts"]
        click.echo(f"\n{counts['critical']} critical, {counts['warning']} warning, {counts['advice']} advice")
    if report["severe"]:
        ctx.exit(SEVERE_EXIT)


@click.command("iso")
@click.option("--out", required=True, type=click.Path(dir_okay=False, writable=True), help="ISO file to write.")
@click.option("--ipxe-lkrn", type=click.Path(exists=True, dir_okay=False),
              help="iPXE .lkrn to use instead of Debian's /usr/lib/ipxe/ipxe.lkrn.")
@json_option
@click.pass_context
def bootstrap_iso(ctx: click.Context, out: str, ipxe_lkrn: str | None, as_json: bool) -> None:
    """Build a BIOS-bootable ISO carrying the bootstrap (for targets that can't PXE)."""
    sources = IsoSources(ipxe_lkrn=Path(ipxe_lkrn)) if ipxe_lkrn else IsoSources()
    row = run(ctx, lambda s: media.issue_iso(s, app_of(ctx).actor, Path(out), sources))
    emit_json(row) if as_json else click.echo(
        f"wrote {out} ({row['size_bytes']} bytes, bootstrap v{row['bootstrap_version']}, {row['mode']} mode: "
        f"{', '.join(row['servers'])}); recorded as ISO #{row['id']}")
