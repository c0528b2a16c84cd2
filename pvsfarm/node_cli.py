"""The ``pvsfarm node`` command."""

from __future__ import annotations

import logging

import click

from pvsfarm.cli import app_of


@click.command()
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.pass_context
def node(ctx: click.Context, log_level: str) -> None:
    """Run a farm node (DHCP off unless the config names an interface)."""
    from pvsfarm.node import run_node

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_node(app_of(ctx))
