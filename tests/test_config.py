import dataclasses
from pathlib import Path

import pytest
import yaml

from pvsfarm.config import NodeConfig, load_config, parse_config
from pvsfarm.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "pvsfarm.example.yaml"


def test_example_config_loads_with_every_section() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.name == "pvs1"
    assert cfg.dhcp.interface == "eth1" and cfg.dhcp.lease_s == 86400
    assert cfg.nbd.listen_port == 10809 and cfg.tftp.listen_port == 69
    assert cfg.database_url is not None and cfg.database_url.startswith("postgresql+psycopg2://")
    assert cfg.store_path == Path("/var/lib/pvsfarm/store")


def test_example_config_shows_every_key() -> None:
    """The README says config/pvsfarm.example.yaml documents every key: hold it to that."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    missing = []
    for f in dataclasses.fields(NodeConfig):
        if f.name not in doc:
            missing.append(f.name)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            missing += [f"{f.name}.{g.name}" for g in dataclasses.fields(default) if g.name not in (doc[f.name] or {})]
    assert missing == []


def test_defaults_keep_dhcp_off_and_use_embedded_sqlite(tmp_path: Path) -> None:
    cfg = parse_config({"data_dir": str(tmp_path)})
    assert cfg.dhcp.interface is None
    assert cfg.db_url == f"sqlite:///{tmp_path / 'pvsfarm.sqlite'}"
    assert NodeConfig().dhcp.interface is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dhcp": {"lease_s": "long"}}, "dhcp.lease_s: expected int"),
        ({"dhcp": {"lease_s": True}}, "dhcp.lease_s: expected int"),
        ({"dhcp": {"leese_s": 5}}, "dhcp.leese_s: unknown key"),
        ({"nbd": {"workers": -1}}, "nbd.workers: expected a non-negative int"),
        ({"tftp": {"busy_poll_us": -5}}, "tftp.busy_poll_us: expected a non-negative int"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"nbd": 5}, "nbd: expected mapping"),
        ({"dhcp": {"dns_servers": "1.1.1.1"}}, "dhcp.dns_servers: expected list"),
        ({"dhcp": {"dns_servers": [1]}}, "dhcp.dns_servers[0]: expected string"),
        ({"tftp": {"enabled": "yes"}}, "tftp.enabled: expected bool"),
        ({"dhcp": {"interface": "eth0"}}, "dhcp.server_ip: required when dhcp.interface is set"),
        ([1, 2], "<top>: expected mapping"),
    ],
)
def test_bad_config_names_the_dotted_path(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == message


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_tftp_busy_poll_and_nbd_workers_are_configurable() -> None:
    cfg = parse_config({"tftp": {"busy_poll_us": 0}, "nbd": {"workers": 0, "busy_poll_us": 0}})
    assert cfg.tftp.busy_poll_us == 0
    assert cfg.nbd.workers == 0
    assert cfg.nbd.busy_poll_us == 0
    assert parse_config({}).nbd.busy_poll_us == 50
