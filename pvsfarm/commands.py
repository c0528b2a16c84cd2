"""Admin subcommands (thin: parse → one service call → print)."""

from __future__ import annotations

from pathlib import Path

import click

from pvsfarm.admin import devices, farm, vdisks
from pvsfarm.cli import app_of, json_option, run
from pvsfarm.cli_util import emit_json, emit_record, emit_table, progress_printer
from pvsfarm.views import BootMethod, BootstrapMode, CacheType, VDiskMode

DEVICE_COLS = ("name", "mac", "ipv4", "collection", "vdisk", "enabled")


def _show(data: object, as_json: bool) -> None:
    emit_json(data) if as_json else emit_record(data)  # type: ignore[arg-type]


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or migrate the schema to the current version."""
    rev = app_of(ctx).upgrade()
    click.echo(f"database at revision {rev}")


@click.group()
def device() -> None:
    """Target devices (matched by MAC at boot)."""


@device.command("add")
@click.option("--mac", required=True)
@click.option("--name", required=True)
@click.option("--ip", "ipv4", help="Reserved IPv4 address (DHCP hands it out).")
@click.option("--collection", help="Device collection (default: 'default').")
@click.option("--vdisk", help="vDisk the device boots.")
@click.option("--disabled", is_flag=True, help="Register but do not boot it.")
@json_option
@click.pass_context
def device_add(ctx: click.Context, mac: str, name: str, ipv4: str | None, collection: str | None,
               vdisk: str | None, disabled: bool, as_json: bool) -> None:
    """Register a device."""
    spec = devices.make_spec(mac, name, ipv4, collection, vdisk, not disabled)
    out = run(ctx, lambda s: devices.add_device(s, app_of(ctx).actor, spec))
    emit_json(out) if as_json else click.echo(f"added device {out['name']} ({out['mac']})")


@device.command("list")
@click.option("--collection")
@json_option
@click.pass_context
def device_list(ctx: click.Context, collection: str | None, as_json: bool) -> None:
    """List devices."""
    rows = run(ctx, lambda s: devices.list_devices(s, collection))
    emit_json(rows) if as_json else emit_table(rows, DEVICE_COLS, "no devices")


@device.command("show")
@click.argument("key")
@json_option
@click.pass_context
def device_show(ctx: click.Context, key: str, as_json: bool) -> None:
    """Show a device (by name or MAC)."""
    _show(run(ctx, lambda s: devices.show_device(s, key)), as_json)


@device.command("set")
@click.argument("key")
@click.option("--mac")
@click.option("--name")
@click.option("--ip", "ipv4", help="New reservation ('' clears it).")
@click.option("--collection")
@click.option("--vdisk", help="New vDisk ('' clears it).")
@click.option("--enable/--disable", "enabled", default=None)
@json_option
@click.pass_context
def device_set(ctx: click.Context, key: str, as_json: bool, **changes: object) -> None:
    """Change a device."""
    out = run(ctx, lambda s: devices.set_device(s, app_of(ctx).actor, key, changes))
    emit_json(out) if as_json else click.echo(f"updated device {out['name']}")


@device.command("remove")
@click.argument("key")
@click.pass_context
def device_remove(ctx: click.Context, key: str) -> None:
    """Remove a device."""
    name = run(ctx, lambda s: devices.remove_device(s, app_of(ctx).actor, key))
    click.echo(f"removed device {name}")


@device.command("import")
@click.option("--csv", "csv_file", required=True, type=click.File("r"), help="CSV with a header row.")
@click.pass_context
def device_import(ctx: click.Context, csv_file: click.utils.LazyFile) -> None:
    """Import devices from CSV (all or nothing)."""
    specs = devices.parse_csv(csv_file.read())
    count = run(ctx, lambda s: devices.import_devices(s, app_of(ctx).actor, specs))
    click.echo(f"imported {count} devices")


@click.group()
def collection() -> None:
    """Device collections."""


@collection.command("add")
@click.argument("name")
@click.option("--description", default="")
@click.pass_context
def collection_add(ctx: click.Context, name: str, description: str) -> None:
    """Create a collection."""
    out = run(ctx, lambda s: devices.add_collection(s, app_of(ctx).actor, name, description))
    click.echo(f"added collection {out['name']}")


@collection.command("list")
@json_option
@click.pass_context
def collection_list(ctx: click.Context, as_json: bool) -> None:
    """List collections."""
    rows = run(ctx, devices.list_collections)
    emit_json(rows) if as_json else emit_table(rows, ("name", "devices", "description"), "no collections")


@click.group()
def vdisk() -> None:
    """vDisk images."""


def _choice(enum_cls: type) -> click.Choice:
    return click.Choice([m.value for m in enum_cls])


@vdisk.command("add")
@click.argument("name")
@click.option("--file", "image", required=True, help="Raw disk image (size a multiple of 512).")
@click.option("--mode", type=_choice(VDiskMode), default="standard", show_default=True)
@click.option("--cache", type=_choice(CacheType), default="server", show_default=True)
@click.option("--boot", type=_choice(BootMethod), default="sanboot", show_default=True)
@click.option("--no-copy", is_flag=True, help="Register the file where it is instead of copying it into the store.")
@json_option
@click.pass_context
def vdisk_add(ctx: click.Context, name: str, image: str, mode: str, cache: str, boot: str, no_copy: bool,
              as_json: bool) -> None:
    """Register a vDisk (copied into this node's store and digested)."""
    app = app_of(ctx)
    cfg = app.config
    vdisks.check_image(Path(image))

    def work(s):  # type: ignore[no-untyped-def]
        server = farm.ensure_server(s, cfg.name, cfg.address, http_port=cfg.http.listen_port,
                                    nbd_port=cfg.nbd.listen_port, tftp_port=cfg.tftp.listen_port)
        return vdisks.add_vdisk(s, app.actor, server, name, Path(image), cfg.store_path,
                                mode=VDiskMode(mode), cache_type=CacheType(cache), boot_method=BootMethod(boot),
                                copy=not no_copy, progress_for=lambda phase: progress_printer(f"vdisk {name}: {phase}"))

    out = run(ctx, work)
    emit_json(out) if as_json else click.echo(f"added vDisk {out['name']} ({out['size_bytes']} bytes, {out['digest']})")


@vdisk.command("copy")
@click.argument("name")
@click.option("--path", "image", required=True, help="The copy's file, as the server sees it.")
@click.option("--server", "server_name", help="Server holding the copy (default: this node, from --config).")
@json_option
@click.pass_context
def vdisk_copy(ctx: click.Context, name: str, image: str, server_name: str | None, as_json: bool) -> None:
    """Record a server's copy of a vDisk after checking its digest (a mismatch is refused)."""
    app = app_of(ctx)
    cfg = app.config

    def work(s):  # type: ignore[no-untyped-def]
        holder = server_name or farm.ensure_server(s, cfg.name, cfg.address, http_port=cfg.http.listen_port,
                                                   nbd_port=cfg.nbd.listen_port, tftp_port=cfg.tftp.listen_port)
        return vdisks.add_copy(s, app.actor, name, holder, Path(image), progress_printer(f"vdisk {name}: digest"))

    out = run(ctx, work)
    where = server_name or cfg.name
    emit_json(out) if as_json else click.echo(f"recorded verified copy of {name} on {where}: {image}")


@vdisk.command("update")
@click.argument("name")
@click.option("--file", "image", required=True, help="New raw image; becomes this node's copy and the digest.")
@json_option
@click.pass_context
def vdisk_update(ctx: click.Context, name: str, image: str, as_json: bool) -> None:
    """Replace a vDisk's content on this node; other nodes' copies turn stale and re-sync."""
    app, cfg = app_of(ctx), app_of(ctx).config
    vdisks.check_image(Path(image))

    def work(s):  # type: ignore[no-untyped-def]
        server = farm.ensure_server(s, cfg.name, cfg.address, http_port=cfg.http.listen_port,
                                    nbd_port=cfg.nbd.listen_port, tftp_port=cfg.tftp.listen_port)
        return vdisks.update_vdisk(s, app.actor, server, name, Path(image), cfg.store_path,
                                   progress_for=lambda phase: progress_printer(f"vdisk {name}: {phase}"))

    out = run(ctx, work)
    emit_json(out) if as_json else click.echo(f"updated vDisk {out['name']} ({out['digest']}); other copies re-sync")


@vdisk.command("status")
@click.argument("name", required=False)
@json_option
@click.pass_context
def vdisk_status(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Copy state of each vDisk on each server: verified / copying n% / stale / missing."""
    rows = run(ctx, lambda s: vdisks.vdisk_status(s, name))
    emit_json(rows) if as_json else emit_table(rows, ("vdisk", "server", "status", "path"), "no vDisks")


@vdisk.command("list")
@json_option
@click.pass_context
def vdisk_list(ctx: click.Context, as_json: bool) -> None:
    """List vDisks."""
    rows = run(ctx, vdisks.list_vdisks)
    cols = ("name", "size_bytes", "mode", "cache_type", "boot_method", "digest")
    emit_json(rows) if as_json else emit_table(rows, cols, "no vDisks")


@vdisk.command("show")
@click.argument("name")
@json_option
@click.pass_context
def vdisk_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show a vDisk and its copies."""
    _show(run(ctx, lambda s: vdisks.show_vdisk(s, name)), as_json)


@vdisk.command("remove")
@click.argument("name")
@click.pass_context
def vdisk_remove(ctx: click.Context, name: str) -> None:
    """Unregister a vDisk (files are kept)."""
    run(ctx, lambda s: vdisks.remove_vdisk(s, app_of(ctx).actor, name))
    click.echo(f"removed vDisk {name}")


@click.group()
def server() -> None:
    """Farm servers (nodes)."""


@server.command("list")
@json_option
@click.pass_context
def server_list(ctx: click.Context, as_json: bool) -> None:
    """List servers with state, load and last heartbeat."""
    dead = app_of(ctx).config.dead_after_s
    rows = run(ctx, lambda s: farm.list_servers(s, dead))
    cols = ("name", "address", "state", "load", "heartbeat_age_s", "health")
    emit_json(rows) if as_json else emit_table(rows, cols, "no servers")


@server.command("add")
@click.argument("name")
@click.option("--address", required=True)
@click.option("--http-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--nbd-port", type=click.IntRange(1, 65535), default=10809, show_default=True)
@click.option("--tftp-port", type=click.IntRange(1, 65535), default=69, show_default=True)
@click.pass_context
def server_add(ctx: click.Context, name: str, address: str, http_port: int, nbd_port: int, tftp_port: int) -> None:
    """Pre-register a server (its node keeps the row up to date once running)."""
    ports = {"http_port": http_port, "nbd_port": nbd_port, "tftp_port": tftp_port}
    run(ctx, lambda s: farm.add_server(s, app_of(ctx).actor, name, address, ports))
    click.echo(f"added server {name}")


@server.command("drain")
@click.argument("name")
@click.pass_context
def server_drain(ctx: click.Context, name: str) -> None:
    """Stop new assignments to a server (maintenance)."""
    run(ctx, lambda s: farm.set_drain(s, app_of(ctx).actor, name, True))
    click.echo(f"server {name} draining: no new targets are assigned to it")


@server.command("undrain")
@click.argument("name")
@click.pass_context
def server_undrain(ctx: click.Context, name: str) -> None:
    """Let a drained server take new targets again."""
    run(ctx, lambda s: farm.set_drain(s, app_of(ctx).actor, name, False))
    click.echo(f"server {name} back in service")


@click.group()
def bootstrap() -> None:
    """The bootstrap: the ordered server list targets log in to."""


@bootstrap.command("configure")
@click.option("--server", "servers", multiple=True, required=True, help="Server name, in order (repeat).")
@click.option("--timeout-ms", type=int, help="Per-server login timeout.")
@click.option("--mode", type=_choice(BootstrapMode), help="listed (only these servers) or live.")
@json_option
@click.pass_context
def bootstrap_configure(ctx: click.Context, servers: tuple[str, ...], timeout_ms: int | None, mode: str | None,
                        as_json: bool) -> None:
    """Set the servers named in the bootstrap."""
    m = BootstrapMode(mode) if mode else None
    out = run(ctx, lambda s: farm.configure_bootstrap(s, app_of(ctx).actor, list(servers), timeout_ms, m))
    emit_json(out) if as_json else click.echo(
        f"bootstrap v{out['version']}: {', '.join(x['name'] for x in out['servers'])}")


@bootstrap.command("show")
@json_option
@click.pass_context
def bootstrap_show(ctx: click.Context, as_json: bool) -> None:
    """Show the bootstrap (and whether issued boot ISOs are stale)."""
    from pvsfarm.admin.media import media_status

    _show(run(ctx, lambda s: {**farm.show_bootstrap(s), **media_status(s)}), as_json)


def register(root: click.Group) -> None:
    from pvsfarm.node_cli import node
    from pvsfarm.target.cli import target

    from pvsfarm.audit_cli import audit, bootstrap_iso
    from pvsfarm.demo import demo

    bootstrap.add_command(bootstrap_iso)
    for group in (db, device, collection, vdisk, server, bootstrap, node, target, audit, demo):
        root.add_command(group)
