"""Bad input: exit non-zero, one line naming the problem, database unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pvsfarm.cli import cli
from tests.cli.conftest import Invoke, snapshot


@pytest.fixture
def seeded(farm: Invoke, image: Path) -> Invoke:
    for args in (
        ("vdisk", "add", "base", "--file", str(image)),
        ("device", "add", "--mac", "52:54:00:12:34:56", "--name", "t1", "--ip", "10.0.0.5", "--vdisk", "base"),
    ):
        result = farm(*args)
        assert result.exit_code == 0, result.output
    return farm


def assert_refused(farm: Invoke, db_url: str, args: tuple[str, ...], needle: str) -> None:
    before = snapshot(db_url)
    result = farm(*args)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert needle in lines[0]
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    ("mac", "needle"),
    [("zz:54:00:12:34:57", "invalid MAC"), ("52:54:00:12:34", "6 octets"), ("01:54:00:12:34:57", "multicast")],
)
def test_invalid_mac(seeded: Invoke, db_url: str, mac: str, needle: str) -> None:
    assert_refused(seeded, db_url, ("device", "add", "--mac", mac, "--name", "t2"), needle)


def test_duplicate_mac(seeded: Invoke, db_url: str) -> None:
    assert_refused(seeded, db_url, ("device", "add", "--mac", "52:54:00:12:34:56", "--name", "t2"),
                   "duplicate MAC 52:54:00:12:34:56")


def test_duplicate_ip_reservation(seeded: Invoke, db_url: str) -> None:
    assert_refused(seeded, db_url, ("device", "add", "--mac", "52:54:00:12:34:57", "--name", "t2", "--ip",
                                    "10.0.0.5"), "duplicate IP reservation 10.0.0.5")


def test_unknown_vdisk(seeded: Invoke, db_url: str) -> None:
    assert_refused(seeded, db_url, ("device", "add", "--mac", "52:54:00:12:34:57", "--name", "t2", "--vdisk",
                                    "nope"), "unknown vDisk 'nope'")


def test_vdisk_file_missing(seeded: Invoke, db_url: str, tmp_path: Path) -> None:
    assert_refused(seeded, db_url, ("vdisk", "add", "v2", "--file", str(tmp_path / "nope.img")), "does not exist")


def test_vdisk_file_not_sector_multiple(seeded: Invoke, db_url: str, tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    assert_refused(seeded, db_url, ("vdisk", "add", "v2", "--file", str(odd)), "multiple of 512")
    assert not (tmp_path / "data" / "store" / "v2.img").exists()


def test_csv_import_is_all_or_nothing(seeded: Invoke, db_url: str, tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("mac,name\n52:54:00:00:00:01,a\n52:54:00:12:34:56,b\n")
    assert_refused(seeded, db_url, ("device", "import", "--csv", str(csv)), "duplicate MAC")
    csv.write_text("mac,name\n52:54:00:00:00:01,a\nnot-a-mac,b\n")
    assert_refused(seeded, db_url, ("device", "import", "--csv", str(csv)), "line 3: invalid MAC")


def test_unreachable_database_url(tmp_path: Path) -> None:
    runner = CliRunner()
    for url, needle in (
        ("postgresql+psycopg2://u:secret@127.0.0.1:1/x", "database unavailable"),
        ("nonsense", "not a valid SQLAlchemy URL"),
    ):
        result = runner.invoke(cli, ["--db", url, "device", "list"], catch_exceptions=False)
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0]
        assert "secret" not in result.output


def test_postgres_without_schema_says_upgrade(pg_url: str) -> None:
    result = CliRunner().invoke(cli, ["--db", pg_url, "device", "list"], catch_exceptions=False)
    assert result.exit_code == 1 and "pvsfarm db upgrade" in result.output
