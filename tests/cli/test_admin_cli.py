"""The admin CLI on SQLite and PostgreSQL (the same tests, parametrized by db_url)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Invoke, snapshot


def ok(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 0, result.output
    return result.stdout


def test_vdisk_then_device_then_list_json(farm: Invoke, image: Path) -> None:
    ok(farm("vdisk", "add", "base", "--file", str(image)))
    ok(farm("device", "add", "--mac", "52:54:00:12:34:56", "--name", "t1", "--vdisk", "base", "--ip", "10.0.0.5"))
    rows = json.loads(ok(farm("device", "list", "--json")))
    assert rows == [{"mac": "52:54:00:12:34:56", "name": "t1", "ipv4": "10.0.0.5", "collection": "default",
                     "vdisk": "base", "enabled": True}]
    text = ok(farm("device", "list"))
    assert "t1" in text and "52:54:00:12:34:56" in text


def test_vdisk_is_copied_digested_and_verified(farm: Invoke, image: Path, tmp_path: Path) -> None:
    out = json.loads(ok(farm("vdisk", "add", "base", "--file", str(image), "--json")))
    assert out["size_bytes"] == image.stat().st_size
    import hashlib

    assert out["digest"] == "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
    (copy,) = out["copies"]
    assert copy["state"] == "verified"
    assert Path(copy["path"]).read_bytes() == image.read_bytes()
    assert Path(copy["path"]).parent == (tmp_path / "data" / "store").resolve()
    listed = json.loads(ok(farm("vdisk", "list", "--json")))
    assert [v["name"] for v in listed] == ["base"]


def test_device_show_set_remove(farm: Invoke, image: Path) -> None:
    ok(farm("vdisk", "add", "base", "--file", str(image)))
    ok(farm("collection", "add", "lab", "--description", "lab targets"))
    ok(farm("device", "add", "--mac", "52-54-00-00-00-01", "--name", "t1", "--collection", "lab"))
    shown = json.loads(ok(farm("device", "show", "52:54:00:00:00:01", "--json")))
    assert shown["name"] == "t1" and shown["collection"] == "lab" and shown["vdisk"] is None
    ok(farm("device", "set", "t1", "--vdisk", "base", "--ip", "10.0.0.9", "--disable"))
    shown = json.loads(ok(farm("device", "show", "t1", "--json")))
    assert (shown["vdisk"], shown["ipv4"], shown["enabled"]) == ("base", "10.0.0.9", False)
    ok(farm("device", "set", "t1", "--ip", ""))
    assert json.loads(ok(farm("device", "show", "t1", "--json")))["ipv4"] is None
    colls = json.loads(ok(farm("collection", "list", "--json")))
    assert colls == [{"name": "lab", "description": "lab targets", "devices": 1}]
    ok(farm("device", "remove", "t1"))
    assert json.loads(ok(farm("device", "list", "--json"))) == []


def test_device_import_csv(farm: Invoke, image: Path, tmp_path: Path) -> None:
    ok(farm("vdisk", "add", "base", "--file", str(image)))
    csv = tmp_path / "d.csv"
    csv.write_text("mac,name,ipv4,vdisk\n52:54:00:00:00:01,a,10.0.0.1,base\n52:54:00:00:00:02,b,,\n")
    assert "imported 2" in ok(farm("device", "import", "--csv", str(csv)))
    rows = json.loads(ok(farm("device", "list", "--json")))
    assert [(r["name"], r["ipv4"], r["vdisk"]) for r in rows] == [("a", "10.0.0.1", "base"), ("b", None, None)]


def test_vdisk_remove_refused_while_in_use(farm: Invoke, image: Path) -> None:
    ok(farm("vdisk", "add", "base", "--file", str(image)))
    ok(farm("device", "add", "--mac", "52:54:00:00:00:01", "--name", "t1", "--vdisk", "base"))
    result = farm("vdisk", "remove", "base")
    assert result.exit_code == 1 and "assigned to device(s) t1" in result.output
    ok(farm("device", "remove", "t1"))
    ok(farm("vdisk", "remove", "base"))
    assert json.loads(ok(farm("vdisk", "list", "--json"))) == []


def test_servers_and_bootstrap(farm: Invoke) -> None:
    ok(farm("server", "add", "s1", "--address", "10.0.0.11"))
    ok(farm("server", "add", "s2", "--address", "10.0.0.12", "--http-port", "8081"))
    out = json.loads(ok(farm("bootstrap", "configure", "--server", "s2", "--server", "s1", "--timeout-ms", "3000",
                             "--json")))
    assert [s["name"] for s in out["servers"]] == ["s2", "s1"] and out["version"] == 1
    again = json.loads(ok(farm("bootstrap", "configure", "--server", "s1", "--mode", "live", "--json")))
    assert again["version"] == 2 and again["mode"] == "live" and again["timeout_ms"] == 3000
    servers = json.loads(ok(farm("server", "list", "--json")))
    assert [(s["name"], s["state"], s["load"]) for s in servers] == [("s1", "down", 0), ("s2", "down", 0)]


def test_changes_are_audited(farm: Invoke, image: Path, db_url: str) -> None:
    ok(farm("vdisk", "add", "base", "--file", str(image)))
    ok(farm("device", "add", "--mac", "52:54:00:00:00:01", "--name", "t1"))
    rows = snapshot(db_url)["audit_log"]
    assert {(r[2], r[3], r[4], r[5]) for r in rows} >= {
        (r[2], "add", "vdisk", "base") for r in rows
    } | {(r[2], "add", "device", "t1") for r in rows}
    assert len(rows) == 2


def test_drain_and_undrain(farm: Invoke) -> None:
    ok(farm("server", "add", "s1", "--address", "10.0.0.11"))
    assert "draining" in ok(farm("server", "drain", "s1"))
    assert json.loads(ok(farm("server", "list", "--json")))[0]["state"] == "draining"
    ok(farm("server", "undrain", "s1"))
    # undrained but never heartbeated: state goes back to up, shown as dead until its node beats
    assert json.loads(ok(farm("server", "list", "--json")))[0]["state"] == "dead"
    result = farm("server", "drain", "nope")
    assert result.exit_code == 1 and "unknown server 'nope'" in result.output
