"""``pvsfarm target``: boot once as a simulated target and report each step."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import click

from pvsfarm.addr import MacAddress
from pvsfarm.cli import json_option
from pvsfarm.target.errors import BootFailed

if TYPE_CHECKING:
    from pvsfarm.target.boot import BootReport


def _text(report: BootReport) -> str:
    t = report.timings_s
    lines = [
        f"dhcp:  {report.address} from {report.dhcp_server} in {t.get('dhcp', 0):.3f} s",
        f"tftp:  {report.boot_file} from {report.tftp_server} in {t.get('tftp', 0):.3f} s "
        f"({len(report.bootstrap_servers)} servers listed)",
        f"login: {report.first_server} via {report.login_url} in {t.get('login', 0):.3f} s (vDisk {report.vdisk})",
        f"nbd:   {report.bytes_read} bytes in {report.reads} reads in {t.get('nbd_read', 0):.3f} s, "
        f"served by {report.server}",
        f"sha256: {report.sha256}" + ("" if report.verified is None else
                                      " (verified)" if report.verified else " (MISMATCH)"),
    ]
    lines += [f"failover: {f.from_server} -> {f.to_server} in {f.seconds:.3f} s ({f.attempts} attempts, "
              f"read at {f.offset} retried)" for f in report.failovers]
    return "\n".join(lines)


@click.command("target")
@click.option("--mac", required=True, help="The target's MAC (also set it on --iface).")
@click.option("--iface", required=True, help="Interface to boot from (DHCP is broadcast there).")
@click.option("--reads", type=click.IntRange(1, 10_000_000), help="Reads to make (default: the whole vDisk).")
@click.option("--read-kib", type=click.IntRange(1, 32 * 1024), default=256, show_default=True)
@click.option("--verify-sha256", "verify", metavar="HEX", help="Fail unless what was read has this SHA-256.")
@click.option("--read-delay-ms", type=click.IntRange(0, 60_000), default=0, show_default=True,
              help="Pause between reads (an OS at work; lets a test kill a node mid-read).")
@click.option("--dhcp-timeout-s", type=click.FloatRange(0.1, 60), default=1.0, show_default=True)
@click.option("--login-timeout-s", type=click.FloatRange(0.1, 120), help="Per-server (default: the bootstrap's).")
@click.option("--read-timeout-s", type=click.FloatRange(0.1, 600), default=5.0, show_default=True)
@click.option("--no-configure", is_flag=True, help="Do not put the leased address on --iface.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@json_option
def target(mac: str, iface: str, reads: int | None, read_kib: int, verify: str | None, read_delay_ms: int,
           dhcp_timeout_s: float, login_timeout_s: float | None, read_timeout_s: float, no_configure: bool,
           log_level: str, as_json: bool) -> None:
    """Boot once as a simulated target: DHCP, TFTP bootstrap, login, NBD reads (with failover)."""
    from pvsfarm.target.boot import TargetSettings, run_target  # aiohttp: only when booting

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TargetSettings(
        mac=MacAddress.parse(mac), iface=iface, reads=reads, read_bytes=read_kib * 1024, verify_sha256=verify,
        configure_address=not no_configure, dhcp_timeout_s=dhcp_timeout_s, login_timeout_s=login_timeout_s,
        read_timeout_s=read_timeout_s, read_delay_s=read_delay_ms / 1000)
    try:
        report = run_target(settings)
    except BootFailed as exc:
        if as_json:
            click.echo(json.dumps({**(exc.report or {}), "error": str(exc), "step": exc.step}, indent=2))
        raise
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else _text(report))
    if report.verified is False:
        raise BootFailed("verify", f"sha256 {report.sha256} != expected {verify}")
